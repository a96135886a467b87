//! libvirt domain XML, rendered from typed structs with serde + quick-xml.
//!
//! Nothing a user sends is spliced into XML text: values go through the
//! serializer, which escapes them. The nimbus `<metadata>` element records
//! which host and instance a domain belongs to, so an agent adopts only its
//! own domains after a restart, even on a libvirt shared with others.

use serde::Serialize;
use std::path::PathBuf;

pub const METADATA_NS: &str = "https://nimbus.dev/xmlns/instance/1";
const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Prefix of every domain name the agent creates.
pub const NAME_PREFIX: &str = "nimbus-";

pub fn domain_name(instance_id: &str) -> String {
    format!("{NAME_PREFIX}{instance_id}")
}

/// Which libvirt driver runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    /// Hardware virtualization through KVM.
    Kvm,
    /// QEMU's TCG emulator: no hardware virtualization needed.
    Qemu,
    /// Xen through libxl (PV guest with direct kernel boot).
    Xen,
    /// libvirt's in-memory `test:///default` driver: agent logic, no guest.
    Test,
}

impl Hypervisor {
    pub fn as_str(self) -> &'static str {
        match self {
            Hypervisor::Kvm => "kvm",
            Hypervisor::Qemu => "qemu",
            Hypervisor::Xen => "xen",
            Hypervisor::Test => "test",
        }
    }
}

/// Everything the agent decides about one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    pub hypervisor: Hypervisor,
    pub host_id: String,
    pub instance_id: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Direct kernel boot; `None`: the firmware boots the root disk's own
    /// boot loader (every standard cloud qcow2).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub root_disk: PathBuf,
    /// The cached base image under `root_disk` (shared, never written).
    pub base_disk: PathBuf,
    pub seed_iso: PathBuf,
    pub console_log: PathBuf,
    /// Unix socket of this guest's metadata server (guestfwd target).
    pub metadata_socket: PathBuf,
    /// User-mode networking: the loopback port of the host forwarded to
    /// the guest's port 22 (`127.0.0.1:PORT`).
    pub ssh_port: Option<u16>,
    /// Who QEMU runs the guest as; libvirt relabels nothing (see [`crate::access`]).
    pub qemu: crate::access::QemuUser,
    /// The guest's VPC interfaces (on links the agent made); empty: QEMU
    /// user-mode networking with the metadata service on `metadata_socket`.
    pub nics: Vec<GuestNic>,
}

/// One VPC interface: its MAC and the device its macvtap sits on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNic {
    pub mac: String,
    pub link: String,
}

#[derive(Serialize)]
#[serde(rename = "domain")]
struct Domain {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "@xmlns:qemu", skip_serializing_if = "Option::is_none")]
    xmlns_qemu: Option<&'static str>,
    name: String,
    metadata: Metadata,
    memory: Memory,
    vcpu: u32,
    os: Os,
    features: Features,
    on_poweroff: &'static str,
    on_reboot: &'static str,
    on_crash: &'static str,
    devices: Devices,
    #[serde(skip_serializing_if = "Option::is_none")]
    seclabel: Option<DomainSeclabel>,
    #[serde(rename = "qemu:commandline", skip_serializing_if = "Option::is_none")]
    qemu_commandline: Option<QemuCommandline>,
}

/// `<seclabel type='static' model='dac' relabel='no'>`: QEMU runs as the
/// given user and libvirt changes the owner of no file (the agent set them:
/// a shared base image or kernel must never be handed to one guest's QEMU).
#[derive(Serialize)]
struct DomainSeclabel {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "@model")]
    model: &'static str,
    #[serde(rename = "@relabel")]
    relabel: &'static str,
    label: String,
}

#[derive(Serialize)]
struct Metadata {
    #[serde(rename = "nimbus:instance")]
    instance: NimbusInstance,
}

#[derive(Serialize)]
struct NimbusInstance {
    #[serde(rename = "@xmlns:nimbus")]
    xmlns: &'static str,
    #[serde(rename = "nimbus:host-id")]
    host_id: String,
    #[serde(rename = "nimbus:instance-id")]
    instance_id: String,
}

#[derive(Serialize)]
struct Memory {
    #[serde(rename = "@unit")]
    unit: &'static str,
    #[serde(rename = "$text")]
    value: u64,
}

#[derive(Serialize)]
struct Os {
    #[serde(rename = "type")]
    os_type: OsType,
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    initrd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cmdline: Option<String>,
    /// `<boot dev='hd'/>`: firmware boot from the root disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    boot: Option<BootDev>,
}

#[derive(Serialize)]
struct BootDev {
    #[serde(rename = "@dev")]
    dev: &'static str,
}

#[derive(Serialize)]
struct OsType {
    #[serde(rename = "@arch", skip_serializing_if = "Option::is_none")]
    arch: Option<&'static str>,
    #[serde(rename = "@machine", skip_serializing_if = "Option::is_none")]
    machine: Option<&'static str>,
    #[serde(rename = "$text")]
    value: &'static str,
}

#[derive(Serialize)]
struct Features {
    #[serde(skip_serializing_if = "Option::is_none")]
    acpi: Option<Empty>,
    #[serde(skip_serializing_if = "Option::is_none")]
    apic: Option<Empty>,
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct Devices {
    disk: Vec<Disk>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    interface: Vec<Interface>,
    #[serde(skip_serializing_if = "Option::is_none")]
    serial: Option<Serial>,
    console: Console,
    #[serde(skip_serializing_if = "Option::is_none")]
    controller: Option<Controller>,
    memballoon: Model,
}

/// `<interface type='direct'>`: a macvtap libvirt makes, in passthrough
/// mode, on the link the agent made (see [`crate::network`]);
/// `<driver name='qemu'/>`: QEMU's own virtio-net back end, never vhost
/// (vhost_net is missing on some hosts, and QEMU aborts asking for it).
#[derive(Serialize)]
struct Interface {
    #[serde(rename = "@type")]
    kind: &'static str,
    mac: MacAddress,
    source: DirectSource,
    model: InterfaceModel,
    driver: DriverName,
}

#[derive(Serialize)]
struct MacAddress {
    #[serde(rename = "@address")]
    address: String,
}

#[derive(Serialize)]
struct DirectSource {
    #[serde(rename = "@dev")]
    dev: String,
    #[serde(rename = "@mode")]
    mode: &'static str,
}

#[derive(Serialize)]
struct InterfaceModel {
    #[serde(rename = "@type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct DriverName {
    #[serde(rename = "@name")]
    name: &'static str,
}

#[derive(Serialize)]
struct Controller {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "@model")]
    model: &'static str,
}

#[derive(Serialize)]
struct Disk {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "@device")]
    device: &'static str,
    driver: Driver,
    source: FileSource,
    #[serde(rename = "backingStore", skip_serializing_if = "Option::is_none")]
    backing_store: Option<BackingStore>,
    target: Target,
    #[serde(skip_serializing_if = "Option::is_none")]
    readonly: Option<Empty>,
}

#[derive(Serialize)]
struct Driver {
    #[serde(rename = "@name")]
    name: &'static str,
    #[serde(rename = "@type")]
    format: &'static str,
}

#[derive(Serialize)]
struct FileSource {
    #[serde(rename = "@file")]
    file: String,
}

/// The overlay's backing file, declared so that libvirt leaves its label alone.
#[derive(Serialize)]
struct BackingStore {
    #[serde(rename = "@type")]
    kind: &'static str,
    format: Format,
    source: FileSource,
    /// Empty: the chain ends here.
    #[serde(rename = "backingStore")]
    end: Empty,
}

#[derive(Serialize)]
struct Format {
    #[serde(rename = "@type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct PathSource {
    #[serde(rename = "@path")]
    path: String,
    /// Keep the console log across restarts of the guest.
    #[serde(rename = "@append", skip_serializing_if = "Option::is_none")]
    append: Option<&'static str>,
}

#[derive(Serialize)]
struct Target {
    #[serde(rename = "@dev")]
    dev: &'static str,
    #[serde(rename = "@bus")]
    bus: &'static str,
}

#[derive(Serialize)]
struct Serial {
    #[serde(rename = "@type")]
    kind: &'static str,
    source: PathSource,
    target: PortTarget,
}

#[derive(Serialize)]
struct PortTarget {
    #[serde(rename = "@port")]
    port: u32,
}

#[derive(Serialize)]
struct Console {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<PathSource>,
    target: ConsoleTarget,
}

#[derive(Serialize)]
struct ConsoleTarget {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "@port")]
    port: u32,
}

#[derive(Serialize)]
struct Model {
    #[serde(rename = "@model")]
    model: &'static str,
}

#[derive(Serialize)]
struct QemuCommandline {
    #[serde(rename = "qemu:arg")]
    args: Vec<QemuArg>,
}

#[derive(Serialize)]
struct QemuArg {
    #[serde(rename = "@value")]
    value: String,
}

fn path(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// QEMU's user-mode network for the guest: DHCP on a link-local /24, the
/// metadata address forwarded to this guest's own metadata socket, and
/// `restrict=on` so no other packet leaves QEMU.
///
/// guestfwd carries every guest connection over one chardev connection to the
/// metadata server; `reconnect=1` re-opens it if the server closed it or the
/// agent restarted. The NIC gets a fixed PCI slot away from the ones libvirt
/// assigns to the disks. The socket path cannot hold a comma (QEMU's option
/// separator): the agent refuses such a state directory at start-up.
///
/// With `ssh_port`, `127.0.0.1:ssh_port` on the host is forwarded to the
/// guest's port 22 (`hostfwd`; `restrict=on` still keeps the guest from
/// opening connections out).
fn user_network_args(metadata_socket: &std::path::Path, ssh_port: Option<u16>) -> Vec<QemuArg> {
    let hostfwd = ssh_port.map(|p| format!(",hostfwd=tcp:127.0.0.1:{p}-:22")).unwrap_or_default();
    let netdev = format!(
        "user,id=nimbus0,restrict=on,net=169.254.169.0/24,host=169.254.169.1,dhcpstart=169.254.169.15{hostfwd},\
         guestfwd=tcp:169.254.169.254:80-unix:{},,reconnect=1",
        metadata_socket.display()
    );
    let nic = "virtio-net-pci,netdev=nimbus0,bus=pci.0,addr=0x10".to_string();
    ["-netdev".to_string(), netdev, "-device".to_string(), nic].into_iter().map(|value| QemuArg { value }).collect()
}

/// Renders the domain XML of a guest.
pub fn render(spec: &GuestSpec) -> Result<String, quick_xml::SeError> {
    let xen = spec.hypervisor == Hypervisor::Xen;
    let (disk_bus, root_dev, seed_dev) = if xen { ("xen", "xvda", "xvdb") } else { ("virtio", "vda", "vdb") };
    let qemu_family = !xen;
    let domain = Domain {
        kind: match spec.hypervisor {
            Hypervisor::Kvm => "kvm",
            // The test driver gets the very XML a TCG host would run.
            Hypervisor::Qemu | Hypervisor::Test => "qemu",
            Hypervisor::Xen => "xen",
        },
        xmlns_qemu: qemu_family.then_some(QEMU_NS),
        name: domain_name(&spec.instance_id),
        metadata: Metadata {
            instance: NimbusInstance { xmlns: METADATA_NS, host_id: spec.host_id.clone(), instance_id: spec.instance_id.clone() },
        },
        memory: Memory { unit: "MiB", value: spec.memory_mib },
        vcpu: spec.vcpus,
        os: Os {
            os_type: if xen {
                OsType { arch: None, machine: None, value: "linux" }
            } else {
                OsType { arch: Some("x86_64"), machine: Some("pc"), value: "hvm" }
            },
            kernel: spec.kernel.as_deref().map(path),
            initrd: spec.kernel.as_ref().and(spec.initrd.as_deref()).map(path),
            cmdline: spec.kernel.as_ref().map(|_| spec.cmdline.clone()),
            boot: spec.kernel.is_none().then_some(BootDev { dev: "hd" }),
        },
        features: Features { acpi: qemu_family.then_some(Empty {}), apic: qemu_family.then_some(Empty {}) },
        on_poweroff: "destroy",
        on_reboot: "restart",
        on_crash: "destroy",
        devices: Devices {
            disk: vec![
                Disk {
                    kind: "file",
                    device: "disk",
                    driver: Driver { name: "qemu", format: "qcow2" },
                    source: FileSource { file: path(&spec.root_disk) },
                    backing_store: Some(BackingStore {
                        kind: "file",
                        format: Format { kind: "qcow2" },
                        source: FileSource { file: path(&spec.base_disk) },
                        end: Empty {},
                    }),
                    target: Target { dev: root_dev, bus: disk_bus },
                    readonly: None,
                },
                Disk {
                    kind: "file",
                    device: "disk",
                    driver: Driver { name: "qemu", format: "raw" },
                    source: FileSource { file: path(&spec.seed_iso) },
                    backing_store: None,
                    target: Target { dev: seed_dev, bus: disk_bus },
                    readonly: Some(Empty {}),
                },
            ],
            interface: spec
                .nics
                .iter()
                .map(|n| Interface {
                    kind: "direct",
                    mac: MacAddress { address: n.mac.clone() },
                    source: DirectSource { dev: n.link.clone(), mode: "passthrough" },
                    model: InterfaceModel { kind: "virtio" },
                    driver: DriverName { name: "qemu" },
                })
                .collect(),
            serial: qemu_family.then(|| Serial {
                kind: "file",
                source: PathSource { path: path(&spec.console_log), append: Some("on") },
                target: PortTarget { port: 0 },
            }),
            console: if xen {
                Console { kind: "pty", source: None, target: ConsoleTarget { kind: "xen", port: 0 } }
            } else {
                Console {
                    kind: "file",
                    source: Some(PathSource { path: path(&spec.console_log), append: Some("on") }),
                    target: ConsoleTarget { kind: "serial", port: 0 },
                }
            },
            controller: qemu_family.then_some(Controller { kind: "usb", model: "none" }),
            memballoon: Model { model: "none" },
        },
        seclabel: qemu_family.then(|| DomainSeclabel { kind: "static", model: "dac", relabel: "no", label: spec.qemu.dac_label() }),
        qemu_commandline: (qemu_family && spec.nics.is_empty())
            .then(|| QemuCommandline { args: user_network_args(&spec.metadata_socket, spec.ssh_port) }),
    };
    let mut out = String::new();
    let mut ser = quick_xml::se::Serializer::new(&mut out);
    ser.indent(' ', 2);
    domain.serialize(ser)?;
    Ok(out)
}

/// The nimbus metadata of a domain, read back from its XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    pub host_id: String,
    pub instance_id: String,
}

/// Reads the nimbus metadata out of a domain's XML description, or `None`
/// when the domain is not one of ours.
pub fn ownership(xml: &str) -> Option<Ownership> {
    use quick_xml::events::Event;
    use quick_xml::name::ResolveResult;
    let mut reader = quick_xml::NsReader::from_str(xml);
    let (mut host_id, mut instance_id) = (None, None);
    let mut current: Option<Vec<u8>> = None;
    loop {
        match reader.read_resolved_event() {
            Ok((ResolveResult::Bound(ns), Event::Start(e))) if ns.as_ref() == METADATA_NS.as_bytes() => {
                current = Some(e.local_name().as_ref().to_vec());
            }
            Ok((_, Event::Text(t))) => {
                if let (Some(name), Ok(text)) = (&current, t.unescape()) {
                    let text = text.trim().to_string();
                    match name.as_slice() {
                        b"host-id" => host_id = Some(text),
                        b"instance-id" => instance_id = Some(text),
                        _ => {}
                    }
                }
            }
            Ok((_, Event::End(_))) => current = None,
            Ok((_, Event::Eof)) | Err(_) => break,
            _ => {}
        }
    }
    Some(Ownership { host_id: host_id?, instance_id: instance_id? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(h: Hypervisor) -> GuestSpec {
        GuestSpec {
            hypervisor: h,
            host_id: "h-0123456789abcdef0".into(),
            instance_id: "i-0123456789abcdef0".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: Some("/var/lib/nimbus/images/k".into()),
            initrd: Some("/var/lib/nimbus/images/i".into()),
            cmdline: "console=ttyS0 nimbus.note=<&'\">".into(),
            root_disk: "/var/lib/nimbus/instances/i-0123456789abcdef0/root.qcow2".into(),
            base_disk: "/var/lib/nimbus/images/0123".into(),
            seed_iso: "/var/lib/nimbus/instances/i-0123456789abcdef0/seed.iso".into(),
            console_log: "/var/lib/nimbus/instances/i-0123456789abcdef0/console.log".into(),
            metadata_socket: "/var/lib/nimbus/instances/i-0123456789abcdef0/metadata.sock".into(),
            ssh_port: None,
            qemu: crate::access::QemuUser { uid: 64055, gid: 107 },
            nics: Vec::new(),
        }
    }

    #[test]
    fn tcg_domain_has_the_expected_shape() {
        let xml = render(&spec(Hypervisor::Qemu)).unwrap();
        assert!(xml.starts_with("<domain type=\"qemu\" xmlns:qemu=\"http://libvirt.org/schemas/domain/qemu/1.0\">"), "{xml}");
        assert!(xml.contains("<name>nimbus-i-0123456789abcdef0</name>"));
        assert!(xml.contains("<memory unit=\"MiB\">512</memory>"));
        assert!(xml.contains("<vcpu>2</vcpu>"));
        assert!(xml.contains("<type arch=\"x86_64\" machine=\"pc\">hvm</type>"));
        assert!(xml.contains("<target dev=\"vda\" bus=\"virtio\"/>"));
        assert!(xml.contains("<serial type=\"file\">"));
        assert!(
            xml.contains("guestfwd=tcp:169.254.169.254:80-unix:/var/lib/nimbus/instances/i-0123456789abcdef0/metadata.sock,,reconnect=1")
        );
        assert!(xml.contains("virtio-net-pci,netdev=nimbus0,bus=pci.0,addr=0x10"));
        // QEMU runs as the QEMU user and libvirt relabels nothing: a shared
        // base image or kernel is never handed to one guest's QEMU.
        assert!(
            xml.contains("<seclabel type=\"static\" model=\"dac\" relabel=\"no\">\n    <label>+64055:+107</label>\n  </seclabel>"),
            "{xml}"
        );
        assert!(xml.contains("restrict=on"));
        assert_eq!(xml.matches("<readonly/>").count(), 1);
    }

    /// A VPC guest: one macvtap `<interface type='direct'>` per link, and
    /// no user-mode network (its metadata service is on the VPC's network).
    #[test]
    fn vpc_guests_get_macvtap_interfaces_and_no_user_network() {
        let mut s = spec(Hypervisor::Qemu);
        s.nics = vec![GuestNic { mac: "02:00:00:00:00:05".into(), link: "nt0123456789ab".into() }];
        let xml = render(&s).unwrap();
        assert!(
            xml.contains(
                "<interface type=\"direct\">\n      <mac address=\"02:00:00:00:00:05\"/>\n      \
                 <source dev=\"nt0123456789ab\" mode=\"passthrough\"/>\n      <model type=\"virtio\"/>\n      <driver name=\"qemu\"/>\n    </interface>"
            ),
            "{xml}"
        );
        assert!(!xml.contains("qemu:commandline") && !xml.contains("guestfwd"), "{xml}");
    }

    /// A disk-booted guest: no kernel, initrd or command line; the
    /// firmware boots the root disk. Its SSH port is forwarded from loopback.
    #[test]
    fn disk_boot_and_ssh_forward() {
        let mut s = spec(Hypervisor::Qemu);
        s.kernel = None;
        s.ssh_port = Some(40022);
        let xml = render(&s).unwrap();
        assert!(xml.contains("<boot dev=\"hd\"/>"), "{xml}");
        assert!(!xml.contains("<kernel>") && !xml.contains("<initrd>") && !xml.contains("<cmdline>"), "{xml}");
        assert!(xml.contains("dhcpstart=169.254.169.15,hostfwd=tcp:127.0.0.1:40022-:22,guestfwd="), "{xml}");
        let kernel = render(&spec(Hypervisor::Qemu)).unwrap();
        assert!(kernel.contains("<kernel>/var/lib/nimbus/images/k</kernel>") && !kernel.contains("<boot "), "{kernel}");
        assert!(!kernel.contains("hostfwd"));
    }

    #[test]
    fn kvm_and_xen_differ_only_where_they_must() {
        let kvm = render(&spec(Hypervisor::Kvm)).unwrap();
        assert!(kvm.starts_with("<domain type=\"kvm\""));
        let xen = render(&spec(Hypervisor::Xen)).unwrap();
        assert!(xen.starts_with("<domain type=\"xen\">"), "{xen}");
        assert!(xen.contains("<type>linux</type>"));
        assert!(xen.contains("<target dev=\"xvda\" bus=\"xen\"/>"));
        assert!(!xen.contains("qemu:commandline"));
        assert!(!xen.contains("seclabel"), "no QEMU user runs a Xen PV guest");
        // The test driver gets the XML of a TCG host.
        assert_eq!(render(&spec(Hypervisor::Test)).unwrap(), render(&spec(Hypervisor::Qemu)).unwrap());
    }

    #[test]
    fn user_values_are_escaped_not_spliced() {
        let xml = render(&spec(Hypervisor::Qemu)).unwrap();
        assert!(xml.contains("nimbus.note=&lt;&amp;'\"&gt;"), "{xml}");
        assert!(!xml.contains("<&'"));
    }

    /// libvirt's own schema accepts what we render, for every hypervisor
    /// (Xen cannot run here, so its XML is checked offline this way).
    #[test]
    fn xml_validates_against_libvirts_schema() {
        let dir = tempfile::tempdir().unwrap();
        let vpc = |h| GuestSpec { nics: vec![GuestNic { mac: "02:00:00:00:00:05".into(), link: "nt0123456789ab".into() }], ..spec(h) };
        let disk = GuestSpec { kernel: None, ssh_port: Some(40022), ..spec(Hypervisor::Qemu) };
        for (i, s) in
            [spec(Hypervisor::Kvm), spec(Hypervisor::Qemu), spec(Hypervisor::Xen), vpc(Hypervisor::Kvm), vpc(Hypervisor::Qemu), disk]
                .iter()
                .enumerate()
        {
            let h = s.hypervisor;
            let file = dir.path().join(format!("{i}.xml"));
            std::fs::write(&file, render(s).unwrap()).unwrap();
            let out = std::process::Command::new("virt-xml-validate")
                .arg(&file)
                .arg("domain")
                .output()
                .expect("virt-xml-validate (package libvirt-clients) must be installed: scripts/install-deps.sh");
            assert!(out.status.success(), "{h:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
    }

    #[test]
    fn ownership_round_trips_through_the_xml() {
        let xml = render(&spec(Hypervisor::Qemu)).unwrap();
        assert_eq!(ownership(&xml), Some(Ownership { host_id: "h-0123456789abcdef0".into(), instance_id: "i-0123456789abcdef0".into() }));
        assert_eq!(ownership("<domain type='qemu'><name>other</name></domain>"), None);
        // Same local names in another namespace are not ours.
        let foreign = "<domain><metadata><x:instance xmlns:x='urn:other'><x:host-id>h</x:host-id>\
                       <x:instance-id>i</x:instance-id><x:metadata-port>1</x:metadata-port></x:instance></metadata></domain>";
        assert_eq!(ownership(foreign), None);
    }
}
