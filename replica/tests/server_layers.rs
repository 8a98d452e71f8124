//! The rebuild's layer ops over the wire: `LayerBlocks`, `ReadLayer` and `Reset` against an in-process
//! replica on 127.0.0.1 port 0 over a fresh temporary store.

use std::net::SocketAddr;
use std::sync::Arc;

use basalt_proto::client::{ClientError, ReplicaClient};
use basalt_proto::frame::{LayerBlock, LayerBlockState, Message, Op, ReplyError};
use basalt_proto::{Epoch, VolumeId};
use basalt_replica::server::{Metrics, Server};
use basalt_replica::store::Store;
use tokio_util::sync::CancellationToken;

const BLOCK: usize = 4096;

fn secret() -> basalt_proto::auth::VolumeSecret {
    basalt_proto::auth::VolumeSecret::new("server-layers-test-secret").unwrap()
}

async fn serve(store: Store) -> (SocketAddr, CancellationToken) {
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(store),
        Metrics::new(),
        secret(),
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(server.run(stop.clone()));
    (addr, stop)
}

#[tokio::test]
async fn a_snapshot_layer_is_listed_and_read_over_the_wire_and_reset_empties_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), 16 << 20).unwrap();
    let volume = store.volume_id();
    store.write(0, &[0x11; 2 * BLOCK]).unwrap();
    store.snapshot_create("a").unwrap();
    store.unmap(0, BLOCK as u64).unwrap();
    store.snapshot_create("b").unwrap();
    let (addr, stop) = serve(store).await;
    let client = ReplicaClient::connect(addr, volume, Epoch(1), &secret())
        .await
        .unwrap();

    let listed = client
        .call(Message::LayerBlocks {
            snapshot: "b".into(),
            start_lba: 0,
            count: 4096,
        })
        .await
        .unwrap();
    assert_eq!(
        listed,
        Message::LayerBlocksOk {
            blocks: vec![LayerBlock {
                lba: 0,
                state: LayerBlockState::Tombstone
            }],
            end_lba: 4096,
        }
    );
    // Pipelined layer reads, each answered with the layer's own bytes.
    let reads: Vec<_> = (0..2u64)
        .map(|lba| {
            client.call(Message::ReadLayer {
                snapshot: "a".into(),
                offset: lba * BLOCK as u64,
                len: BLOCK as u32,
            })
        })
        .collect();
    for read in reads {
        match read.await.unwrap() {
            Message::ReadLayerOk { data } => assert!(data.iter().all(|&b| b == 0x11)),
            other => panic!("expected ReadLayerOk, got {other:?}"),
        }
    }
    let missing = client
        .call(Message::ReadLayer {
            snapshot: "nope".into(),
            offset: 0,
            len: BLOCK as u32,
        })
        .await;
    match missing {
        Err(ClientError::Replica { op, error, .. }) => {
            assert_eq!((op, error), (Op::ReadLayer, ReplyError::NoSuchSnapshot))
        }
        other => panic!("a missing snapshot must be refused: {other:?}"),
    }

    assert_eq!(client.call(Message::Reset).await.unwrap(), Message::ResetOk);
    assert_eq!(
        client.call(Message::SnapshotList).await.unwrap(),
        Message::SnapshotListOk(vec![])
    );
    let data = client.read(0, 2 * BLOCK as u32).await.unwrap();
    assert!(data.iter().all(|&b| b == 0), "a reset replica reads zeros");
    stop.cancel();
}
