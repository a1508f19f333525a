//! A TCP relay in front of a server that can be cut (the server "dies": open connections are
//! reset, new ones refused) and restored on the same address. For failure tests and benchmarks
//! on loopback.

use std::net::SocketAddr;

use tokio::task::JoinHandle;

#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    target: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    /// A relay to `target` on a free loopback port.
    pub async fn start(target: SocketAddr) -> std::io::Result<Relay> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// A relay to `target` listening on `at`.
    pub async fn start_on(at: SocketAddr, target: SocketAddr) -> std::io::Result<Relay> {
        let listener = tokio::net::TcpListener::bind(at).await?;
        let addr = listener.local_addr()?;
        Ok(Relay { addr, target, task: Some(tokio::spawn(run(listener, target))) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every relayed connection and stops listening.
    pub fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Listens again on the same address.
    pub async fn restore(&mut self) -> std::io::Result<()> {
        self.cut();
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        self.task = Some(tokio::spawn(run(listener, self.target)));
        Ok(())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

async fn run(listener: tokio::net::TcpListener, target: SocketAddr) {
    // Connections live in this task's set: aborting the task drops them all.
    let mut conns = tokio::task::JoinSet::new();
    while let Ok((mut inbound, _)) = listener.accept().await {
        let _ = inbound.set_nodelay(true);
        conns.spawn(async move {
            if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                let _ = out.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            }
        });
    }
}
