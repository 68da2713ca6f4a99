//! A few seconds of the bench against an in-process memory-broker node:
//! the fan-out path delivers everything and the JSON line says so.
#![allow(clippy::unwrap_used)]

use chorus_bench::Cli;
use chorus_tests::TestNode;
use clap::Parser;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_against_a_memory_node_loses_nothing() {
    let node = TestNode::start(&["--broker", "memory://"]).await;
    let cli = Cli::try_parse_from([
        "chorus-bench",
        "--url",
        &node.ws_url(),
        "--floor-writer",
        env!("CARGO_BIN_EXE_chorus-bench"),
        "fanout",
        "--subscribers",
        "10",
        "--messages",
        "20",
        "--rate",
        "200",
    ])
    .unwrap();
    let lines = chorus_bench::run(cli).await.unwrap();
    assert_eq!(lines.len(), 1);
    let line = &lines[0];
    println!("{line}");
    assert_eq!(line["scenario"], "fanout");
    assert_eq!(line["published_ok"], 20);
    assert_eq!(line["deliveries_expected"], 200);
    assert_eq!(line["deliveries"], 200);
    assert_eq!(line["lost"], 0);
    assert_eq!(line["duplicates"], 0);
    assert_eq!(line["out_of_order"], 0);
    assert_eq!(line["outcome"]["delivered"], 200);
    assert_eq!(line["outcome"]["shed"], 0);
    // External nodes: no pid, so no CPU figure rather than a wrong one;
    // the floor is the bench's own, measured all the same.
    assert!(line["cpu_s_per_m_deliveries"].is_null());
    // (200 writes: below the 10 ms tick of the CPU accounting.)
    assert!(line["floor_us_per_delivery"].as_f64().unwrap() >= 0.0);
    assert!(line["cpu_over_floor"].is_null());
    node.stop().await;
}
