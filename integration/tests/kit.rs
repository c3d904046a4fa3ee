//! The kit's own checks: the nats-server guard really runs a JetStream server.

use std::net::TcpStream;

use mnistflow_integration::{MNIST_FILES, NatsServer, mnist_dir};

#[test]
fn nats_server_listens_restarts_on_the_same_port_and_dies_on_drop() {
    let mut server = NatsServer::start();
    let port = server.port();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    server.restart();
    assert_eq!(server.port(), port);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    drop(server);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "server still listening after drop");
}

#[test]
fn the_real_mnist_files_are_reachable() {
    let dir = mnist_dir();
    let total: u64 = MNIST_FILES.iter().map(|f| std::fs::metadata(dir.join(f)).unwrap().len()).sum();
    assert!(total > 11_000_000, "MNIST looks incomplete: {total} bytes");
}
