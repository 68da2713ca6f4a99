//! `Secret <name>-redis-auth`: the generated Redis password, when the user
//! gave no `passwordSecretRef`. The reconciler creates it once and never
//! rewrites it: the password lives only in this Secret.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;

use super::config_map::GENERATED_PASSWORD_KEY;
use super::meta::{Component, object_meta};
use crate::cluster::ValidCluster;

/// Characters in a generated password.
pub const PASSWORD_LEN: usize = 32;

/// A fresh random password (alphanumeric, so it needs no quoting anywhere).
pub fn generate_password() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), PASSWORD_LEN)
}

pub fn build(c: &ValidCluster, password: &str) -> Secret {
    let names = &c.names;
    Secret {
        metadata: object_meta(c, &names.redis_auth_secret, Component::Redis),
        type_: Some("Opaque".to_owned()),
        string_data: Some(BTreeMap::from([(
            GENERATED_PASSWORD_KEY.to_owned(),
            password.to_owned(),
        )])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{TestCluster, UID, valid};
    use super::*;
    use chorus_crds::MessagingCluster;

    #[test]
    fn secret_holds_the_given_password_under_password() {
        let mc = MessagingCluster::test();
        let s = build(&valid(&mc), "hunter2");
        assert_eq!(s.metadata.name.as_deref(), Some("chat-redis-auth"));
        assert_eq!(s.metadata.owner_references.expect("owner")[0].uid, UID);
        assert_eq!(s.string_data.expect("data")["password"], "hunter2");
    }

    #[test]
    fn generated_passwords_are_long_alphanumeric_and_differ() {
        let (a, b) = (generate_password(), generate_password());
        assert_eq!(a.len(), PASSWORD_LEN);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }
}
