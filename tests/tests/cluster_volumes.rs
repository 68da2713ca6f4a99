//! The one-node cluster's storage provisioner (`scripts/cluster/volumes.sh`,
//! run by `scripts/cluster.sh up`): one pass against a fake kubectl binds
//! Pending claims of StorageClass `local` to 0777 folders and reclaims
//! only its own Released volumes (`scripts/cluster/test_volumes.sh`). No
//! cluster needed.

use std::process::Command;

#[test]
fn host_folder_provisioner_binds_pending_claims_and_reclaims_released_volumes() {
    let script = chorus_tests::cluster::repo().join("scripts/cluster/test_volumes.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success() && out.stdout == b"ok\n",
        "{} failed:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
