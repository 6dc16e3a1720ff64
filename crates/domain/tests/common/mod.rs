//! Helpers shared by the in-process domain tests: keys and a raw node session.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use stardust_proto::identity::Identity;
use stardust_proto::message::{self, DomainMessage, Hello, encode};
use stardust_proto::task::{Hardware, Tier};
use tokio_tungstenite::tungstenite::Message;

/// A fixed key per number.
pub fn key(i: u8) -> Identity {
    Identity::from_secret_bytes(&[i; 32])
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn next_domain(ws: &mut Ws) -> Option<DomainMessage> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .ok()??
        {
            Ok(Message::Binary(b)) => {
                return message::decode::<DomainMessage>(&b, 1 << 20)
                    .ok()
                    .map(|(_, m)| m);
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Opens a node session; returns the socket after the welcome.
pub async fn join(addr: SocketAddr, node: &Identity, slots: u32) -> Ws {
    join_as(addr, node, slots, Tier::Small).await
}

/// [`join`] declaring `tier`.
pub async fn join_as(addr: SocketAddr, node: &Identity, slots: u32, tier: Tier) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/nodes/connect"))
        .await
        .expect("connect");
    let Some(DomainMessage::Challenge { nonce, .. }) = next_domain(&mut ws).await else {
        panic!("no challenge")
    };
    let hello = Hello {
        nonce,
        agent: "test".into(),
        slots,
        hardware: Hardware {
            cores: 4,
            memory_bytes: 8 << 30,
            ..Hardware::default()
        },
        tier,
    };
    ws.send(Message::Binary(encode(node, &hello).into()))
        .await
        .expect("hello");
    assert!(matches!(
        next_domain(&mut ws).await,
        Some(DomainMessage::Welcome { .. })
    ));
    ws
}

/// Uploads `test-programs/hello.wasm` through `client`; returns its content id.
pub async fn upload_hello(client: &stardust_sdk::Client) -> stardust_proto::content::ContentId {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../test-programs/hello.wasm"
    ))
    .expect("test-programs/hello.wasm");
    client.put_blob(bytes).await.expect("upload hello.wasm")
}
