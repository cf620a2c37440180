//! Runs a simulated cluster (a test double) until Ctrl-C, writing its admin kubeconfig to
//! the path given as the first argument (default: print it).
//!
//!     cargo run -p kinvoke-simcluster --example serve -- /tmp/sim.kubeconfig
//!     KUBECONFIG=/tmp/sim.kubeconfig kubectl get pods -A

use kinvoke_simcluster::{SimCluster, SimOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sim = SimCluster::start(SimOptions::default()).await?;
    match std::env::args().nth(1) {
        Some(path) => {
            std::fs::write(&path, sim.admin_kubeconfig())?;
            eprintln!(
                "simulated cluster at {}; kubeconfig written to {path}",
                sim.url()
            );
        }
        None => print!("{}", sim.admin_kubeconfig()),
    }
    tokio::signal::ctrl_c().await?;
    sim.shutdown().await;
    Ok(())
}
