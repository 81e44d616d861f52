//! Sandbox blueprints: a YAML or JSON file with the network and the apps of a sandbox, turned
//! into es-shells job specs. Unknown keys are refused; errors name the key and its line.
//!
//! ```yaml
//! network:
//!   mode: dedicated            # dedicated | shared | single
//!   vpc_cidr: 10.1.0.0/16      # dedicated only
//!   subnets:
//!     - { name: app, cidr: 10.1.1.0/24, public: true }
//!   management: { vpc_id: vpc-0abc, cidr: 10.0.0.0/16, route_table_ids: [rtb-0abc] }
//!   shared: { vpc_id: vpc-0def, transit_gateway_id: tgw-0123 }   # shared only
//! target: { role_arn: "arn:aws:iam::123456789012:role/es-shells", region: us-east-1 }  # optional
//! apps:
//!   - name: web
//!     ami: ami-0123456789abcdef0
//!     instance_type: t3.micro
//!     subnets: [app]
//!     public_ip: elastic       # none | auto | elastic
//!     inbound: [{ protocol: tcp, from_port: 443, to_port: 443 }]
//! ```

use std::collections::HashMap;
use std::path::Path;

use es_proto::v1::{
    AppSpec, AwsTarget, ManagementNetwork, NetworkMode, PortRule, PrepareSandboxNetwork, PublicIp,
    SharedVpc, SubnetRequest,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blueprint {
    pub network: Option<Network>,
    #[serde(default)]
    pub apps: Vec<App>,
    pub target: Option<Target>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub mode: String,
    #[serde(default)]
    pub vpc_cidr: String,
    pub subnets: Vec<Subnet>,
    pub management: Management,
    pub shared: Option<Shared>,
    /// The sandbox key pair: ed25519 (default), rsa (Windows apps) or none.
    #[serde(default)]
    pub key_type: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subnet {
    pub name: String,
    pub cidr: String,
    #[serde(default)]
    pub public: bool,
    #[serde(default)]
    pub availability_zone: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Management {
    pub vpc_id: String,
    pub cidr: String,
    #[serde(default)]
    pub route_table_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shared {
    pub vpc_id: String,
    pub transit_gateway_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(default)]
    pub role_arn: String,
    #[serde(default)]
    pub external_id: String,
    #[serde(default)]
    pub region: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    pub name: String,
    pub ami: String,
    pub instance_type: String,
    pub subnets: Vec<String>,
    #[serde(default)]
    pub isolated: bool,
    #[serde(default)]
    pub inbound: Vec<Port>,
    #[serde(default)]
    pub public_ip: Option<String>,
    #[serde(default)]
    pub root_volume_gb: u32,
    #[serde(default)]
    pub root_volume_type: String,
    #[serde(default)]
    pub root_device_name: String,
    #[serde(default)]
    pub user_data: String,
    #[serde(default)]
    pub instance_profile: String,
    #[serde(default)]
    pub tags: HashMap<String, String>,
    /// IMDSv2 only unless true.
    #[serde(default)]
    pub imds_v1_allowed: bool,
    /// Metadata response hops, 1..=64 (0 = 2).
    #[serde(default)]
    pub imds_hop_limit: u32,
    #[serde(default)]
    pub root_volume_iops: u32,
    /// MiB/s, gp3 only.
    #[serde(default)]
    pub root_volume_throughput: u32,
    #[serde(default)]
    pub data_volumes: Vec<DataVolume>,
    /// KMS key for every volume of the app (empty = the account's EBS default key).
    #[serde(default)]
    pub kms_key_id: String,
    /// One per NIC, in the order of `subnets` ("" = any).
    #[serde(default)]
    pub private_ips: Vec<String>,
    #[serde(default)]
    pub secondary_private_ips: u32,
    #[serde(default)]
    pub wait_status_checks: bool,
    #[serde(default)]
    pub wait_timeout_s: u32,
    /// An existing key pair instead of the sandbox's.
    #[serde(default)]
    pub key_pair: String,
    /// Spot capacity, falling back to on demand when refused.
    #[serde(default)]
    pub spot: bool,
    /// USD per instance-hour, e.g. "0.05" (empty = the on-demand price).
    #[serde(default)]
    pub spot_max_price: String,
    /// Windows: wait for the administrator password (written to SANDBOX-APP.password, 0600).
    #[serde(default)]
    pub wait_password: bool,
    /// User data fetched by the agent (https), {{name}} replaced from `user_data_params`.
    #[serde(default)]
    pub user_data_url: String,
    #[serde(default)]
    pub user_data_params: HashMap<String, String>,
    /// Existing groups (ids) the app joins too, in the sandbox's VPC.
    #[serde(default)]
    pub security_groups: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataVolume {
    pub device_name: String,
    pub size_gb: u32,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub iops: u32,
    #[serde(default)]
    pub throughput: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    pub protocol: String,
    pub from_port: u32,
    pub to_port: u32,
    #[serde(default)]
    pub cidr: String,
}

impl Blueprint {
    /// Reads a YAML or JSON blueprint (JSON is YAML too).
    pub fn load(path: &Path) -> Result<Blueprint, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn prepare(&self) -> Result<Option<PrepareSandboxNetwork>, String> {
        let Some(n) = &self.network else {
            return Ok(None);
        };
        let mode = match n.mode.as_str() {
            "dedicated" => NetworkMode::Dedicated,
            "shared" => NetworkMode::Shared,
            "single" => NetworkMode::Single,
            other => {
                return Err(format!(
                    "network.mode: {other:?} is not a mode; use dedicated, shared or single"
                ))
            }
        };
        // The apps' images decide the key type when the blueprint does not (Windows: RSA).
        let mut amis: Vec<String> = self.apps.iter().map(|a| a.ami.clone()).collect();
        amis.sort();
        amis.dedup();
        Ok(Some(PrepareSandboxNetwork {
            amis,
            key_type: n.key_type.clone(),
            mode: mode as i32,
            vpc_cidr: n.vpc_cidr.clone(),
            subnets: n
                .subnets
                .iter()
                .map(|s| SubnetRequest {
                    name: s.name.clone(),
                    cidr: s.cidr.clone(),
                    public: s.public,
                    availability_zone: s.availability_zone.clone(),
                })
                .collect(),
            management: Some(ManagementNetwork {
                vpc_id: n.management.vpc_id.clone(),
                cidr: n.management.cidr.clone(),
                route_table_ids: n.management.route_table_ids.clone(),
            }),
            shared: n.shared.as_ref().map(|s| SharedVpc {
                vpc_id: s.vpc_id.clone(),
                transit_gateway_id: s.transit_gateway_id.clone(),
            }),
        }))
    }

    pub fn apps(&self) -> Result<Vec<AppSpec>, String> {
        self.apps
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let public_ip = match a.public_ip.as_deref().unwrap_or("none") {
                    "none" => PublicIp::None,
                    "auto" => PublicIp::Auto,
                    "elastic" => PublicIp::Elastic,
                    other => {
                        return Err(format!(
                            "apps[{i}].public_ip: {other:?}; use none, auto or elastic"
                        ))
                    }
                };
                Ok(AppSpec {
                    name: a.name.clone(),
                    ami: a.ami.clone(),
                    instance_type: a.instance_type.clone(),
                    subnets: a.subnets.clone(),
                    isolated: a.isolated,
                    inbound: a
                        .inbound
                        .iter()
                        .map(|p| PortRule {
                            protocol: p.protocol.clone(),
                            from_port: p.from_port,
                            to_port: p.to_port,
                            cidr: p.cidr.clone(),
                        })
                        .collect(),
                    public_ip: public_ip as i32,
                    root_volume_gb: a.root_volume_gb,
                    root_volume_type: a.root_volume_type.clone(),
                    user_data: a.user_data.clone(),
                    instance_profile: a.instance_profile.clone(),
                    tags: a.tags.clone(),
                    root_device_name: a.root_device_name.clone(),
                    imds_v1_allowed: a.imds_v1_allowed,
                    imds_hop_limit: a.imds_hop_limit,
                    root_volume_iops: a.root_volume_iops,
                    root_volume_throughput: a.root_volume_throughput,
                    data_volumes: a
                        .data_volumes
                        .iter()
                        .map(|d| es_proto::v1::DataVolume {
                            device_name: d.device_name.clone(),
                            size_gb: d.size_gb,
                            r#type: d.kind.clone(),
                            iops: d.iops,
                            throughput: d.throughput,
                        })
                        .collect(),
                    kms_key_id: a.kms_key_id.clone(),
                    private_ips: a.private_ips.clone(),
                    secondary_private_ips: a.secondary_private_ips,
                    wait_status_checks: a.wait_status_checks,
                    wait_timeout_s: a.wait_timeout_s,
                    key_pair: a.key_pair.clone(),
                    spot: a.spot,
                    spot_max_price: a.spot_max_price.clone(),
                    wait_password: a.wait_password,
                    user_data_url: a.user_data_url.clone(),
                    user_data_params: a.user_data_params.clone(),
                    security_groups: a.security_groups.clone(),
                })
            })
            .collect()
    }

    pub fn target(&self) -> Option<AwsTarget> {
        self.target.as_ref().map(|t| AwsTarget {
            role_arn: t.role_arn.clone(),
            external_id: t.external_id.clone(),
            region: t.region.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_yaml_and_names_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bp.yaml");
        std::fs::write(
            &f,
            "network:\n  mode: dedicated\n  vpc_cidr: 10.1.0.0/16\n  subnets: [{name: app, cidr: 10.1.1.0/24, public: true}]\n  management: {vpc_id: vpc-1, cidr: 10.0.0.0/16}\napps:\n  - {name: web, ami: ami-1, instance_type: t3.micro, subnets: [app], public_ip: elastic, tags: {Team: qa}, imds_hop_limit: 1}\n",
        )
        .unwrap();
        let bp = Blueprint::load(&f).unwrap();
        let p = bp.prepare().unwrap().unwrap();
        assert_eq!(p.mode, NetworkMode::Dedicated as i32);
        let apps = bp.apps().unwrap();
        assert_eq!(apps[0].public_ip, PublicIp::Elastic as i32);
        assert_eq!(apps[0].tags["Team"], "qa");
        assert_eq!(
            (apps[0].imds_v1_allowed, apps[0].imds_hop_limit),
            (false, 1),
            "IMDSv2 only unless asked"
        );
        std::fs::write(
            &f,
            "apps:\n  - {name: web, ami: ami-1, instance_typ: t3.micro, subnets: [app]}\n",
        )
        .unwrap();
        let err = Blueprint::load(&f).unwrap_err();
        assert!(err.contains("instance_typ"), "{err}");
        let json = dir.path().join("bp.json");
        std::fs::write(&json, r#"{"apps": [{"name": "a", "ami": "ami-1", "instance_type": "t3.micro", "subnets": ["app"], "public_ip": "sometimes"}]}"#).unwrap();
        let err = Blueprint::load(&json).unwrap().apps().unwrap_err();
        assert!(err.contains("apps[0].public_ip"), "{err}");
    }
}
