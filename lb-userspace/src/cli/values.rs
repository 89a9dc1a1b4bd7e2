//! The CLI's spellings of the model's enums. The model's types are also the
//! API's and the settings files' (serde only), so clap gets mirrors here:
//! the same names and help, parsed straight into the model's type. A variant
//! added on either side fails to compile until both agree.

use clap::{
    ValueEnum,
    builder::{EnumValueParser, TypedValueParser},
};

/// A clap enum standing for `Model`, variant for variant.
pub trait Mirror: ValueEnum + Clone + Send + Sync + 'static {
    type Model: From<Self> + Clone + Send + Sync + 'static;
}

/// Parses `M`'s spellings (listed with their help in `--help`) into its model type.
pub fn parser<M: Mirror>() -> impl TypedValueParser<Value = M::Model> {
    EnumValueParser::<M>::new().map(M::Model::from)
}

macro_rules! mirror {
    ($(#[$attr:meta])* $name:ident => $model:ty { $($(#[$vattr:meta])* $variant:ident),* $(,)? }) => {
        $(#[$attr])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
        pub enum $name {
            $($(#[$vattr])* $variant),*
        }

        impl Mirror for $name {
            type Model = $model;
        }

        impl From<$name> for $model {
            fn from(v: $name) -> Self {
                match v {
                    $($name::$variant => Self::$variant),*
                }
            }
        }

        impl From<$model> for $name {
            fn from(v: $model) -> Self {
                type Model = $model;
                match v {
                    $(Model::$variant => $name::$variant),*
                }
            }
        }
    };
}

mirror! {
    Proto => crate::api::Proto { Tcp, Udp }
}

mirror! {
    Role => crate::ha::Role {
        /// Sends its flow state; ignores the peer's.
        Master,
        /// Installs the peer's flow state.
        Backup,
    }
}

mirror! {
    AttachMode => crate::model::AttachMode {
        /// Driver mode; fails where the driver has no XDP support.
        Native,
        /// Generic (skb) mode: works everywhere, slower.
        Generic,
        /// Native, falling back to generic (the mode used is reported).
        Auto,
    }
}

mirror! {
    Scheduler => crate::model::settings::Scheduler {
        /// Weighted Maglev consistent hashing (default): the same flow maps to
        /// the same backend on every balancer, and a backend change moves only
        /// about its own share of flows.
        Maglev,
        /// Smooth weighted round robin (per-CPU cursor).
        Wrr,
        /// Least connections (two random choices, weighted).
        LeastConn,
    }
}

mirror! {
    MissPolicy => crate::model::settings::MissPolicy {
        /// A RST from the XDP program: the client reconnects at once.
        Reset,
        /// Scheduled by flow hash and given an entry (several balancers with the
        /// same backends then agree on the backend).
        Rehash,
    }
}

mirror! {
    NatMode => crate::model::settings::NatMode {
        /// Destination NAT: backends see the client's address and must route
        /// their replies back through the balancer.
        Dnat,
        /// Full NAT: backends see one of the balancer's addresses and a port
        /// from the service's pool; replies come back without any routing.
        Fullnat,
        /// Direct server return: packets reach the backends IPIP-encapsulated,
        /// untouched; backends hold the VIP and answer clients directly
        /// (`xlb backend-setup`). IPv4; backend port = VIP port.
        Dsr,
    }
}

mirror! {
    NoPortPolicy => crate::model::settings::NoPortPolicy {
        /// A TCP SYN is answered with a RST (the client fails at once);
        /// UDP is dropped.
        Reset,
        /// Dropped (the client retries its SYN).
        Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CLI spells each value as the API and settings files do (serde).
    fn same_spelling<M: Mirror + std::fmt::Debug>()
    where
        M::Model: serde::Serialize,
    {
        for v in M::value_variants() {
            let name = v.to_possible_value().map(|p| p.get_name().to_owned());
            let serde = serde_json::to_value(M::Model::from(v.clone())).ok().and_then(|j| j.as_str().map(str::to_owned));
            assert_eq!(name, serde, "{v:?}");
        }
    }

    #[test]
    fn cli_and_serde_spellings_agree() {
        same_spelling::<Proto>();
        same_spelling::<Role>();
        same_spelling::<AttachMode>();
        same_spelling::<Scheduler>();
        same_spelling::<MissPolicy>();
        same_spelling::<NatMode>();
        same_spelling::<NoPortPolicy>();
    }
}
