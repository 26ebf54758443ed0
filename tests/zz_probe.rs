mod common;
use common::*;
use futures::{StreamExt, TryStreamExt};
use ocigc::store::Store;

#[tokio::test]
async fn probe() {
    let t = seaweed_store().await;
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let keys = [
        "a/b-c/1",
        "a/b.x",
        "a/b/1",
        "a/b/2/3",
        "a/b0",
        "a/ba",
        "lib/alpine-edge/x",
        "lib/alpine/y",
        "lib/alpine.z",
        "top",
    ];
    futures::stream::iter(keys.iter())
        .for_each_concurrent(8, |k| f.put(k, b"x"))
        .await;
    let show = |v: Vec<Vec<ocigc::store::ObjectMeta>>| {
        v.into_iter().flatten().map(|o| o.key).collect::<Vec<_>>()
    };
    println!(
        "plain {:?}",
        show(t.store.list("").try_collect().await.unwrap())
    );
    for sa in [
        "a/b",
        "a/b/",
        "a/b/1",
        "a/b-c/1",
        "a/b.x",
        "a/b0",
        "lib/alpine",
        "lib/alpine-edge/x",
        "lib/alpine/",
        "lib/alpine/y",
        "lib/alpine.z",
    ] {
        println!(
            "after {sa:?}: {:?}",
            show(
                t.store
                    .list_after("", Some(sa))
                    .try_collect()
                    .await
                    .unwrap()
            )
        );
    }
    println!(
        "prefix lib/alpine {:?}",
        show(t.store.list("lib/alpine").try_collect().await.unwrap())
    );
}
