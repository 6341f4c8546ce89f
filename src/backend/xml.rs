//! Reading the bits of libvirt XML the backends need: ownership tags, object names, disks,
//! bridges and accelerators. Shared by the libvirt and the fake backend so both read tags the
//! same way. Namespaces are matched by URI, never by prefix: a foreign element that happens to
//! use the prefix `klab` is not ours.

use quick_xml::XmlVersion;
use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;

use super::{AccelSupport, BackendError, OwnerTag};
use crate::plan::OWNER_NS;

/// A parsed XML element: namespace URI (if bound), local name, attributes by local name
/// (namespace declarations dropped), children and concatenated text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    pub ns: Option<String>,
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// Text of the child `name`, trimmed; `None` when absent or empty.
    pub fn child_text(&self, name: &str) -> Option<String> {
        self.child(name)
            .map(|c| c.text.trim().to_string())
            .filter(|t| !t.is_empty())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("malformed XML: {0}")]
pub struct XmlError(String);

/// Parse a whole document into its root element.
pub fn parse(xml: &str) -> Result<Element, XmlError> {
    let mut reader = NsReader::from_str(xml);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let (resolved, event) = reader
            .read_resolved_event()
            .map_err(|e| XmlError(e.to_string()))?;
        let ns = match resolved {
            ResolveResult::Bound(ns) => Some(ns.as_ref().to_string()),
            _ => None,
        };
        let is_empty = matches!(event, Event::Empty(_));
        match event {
            Event::Start(start) | Event::Empty(start) => {
                let name = start.local_name().as_ref().to_string();
                let mut attrs = Vec::new();
                for attr in start.attributes() {
                    let attr = attr.map_err(|e| XmlError(e.to_string()))?;
                    let key = attr.key;
                    if key.as_namespace_binding().is_some() {
                        continue;
                    }
                    let value = attr
                        .normalized_value(XmlVersion::Implicit1_0)
                        .map_err(|e| XmlError(e.to_string()))?
                        .into_owned();
                    attrs.push((key.local_name().as_ref().to_string(), value));
                }
                let element = Element {
                    ns,
                    name,
                    attrs,
                    ..Element::default()
                };
                if is_empty {
                    attach(&mut stack, &mut root, element)?;
                } else {
                    stack.push(element);
                }
            }
            Event::End(_) => {
                let element = stack
                    .pop()
                    .ok_or_else(|| XmlError("unbalanced end tag".into()))?;
                attach(&mut stack, &mut root, element)?;
            }
            Event::Text(text) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&text.xml10_content());
                }
            }
            Event::CData(data) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&data.xml10_content());
                }
            }
            Event::GeneralRef(r) => {
                if let Some(top) = stack.last_mut() {
                    let resolved = match r.resolve_char_ref() {
                        Ok(Some(c)) => Some(c),
                        _ => match r.xml10_content().as_ref() {
                            "lt" => Some('<'),
                            "gt" => Some('>'),
                            "amp" => Some('&'),
                            "quot" => Some('"'),
                            "apos" => Some('\''),
                            _ => None,
                        },
                    };
                    if let Some(c) = resolved {
                        top.text.push(c);
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(XmlError("unexpected end of document".into()));
    }
    root.ok_or_else(|| XmlError("no root element".into()))
}

fn attach(
    stack: &mut [Element],
    root: &mut Option<Element>,
    element: Element,
) -> Result<(), XmlError> {
    match stack.last_mut() {
        Some(parent) => {
            parent.children.push(element);
            Ok(())
        }
        None if root.is_none() => {
            *root = Some(element);
            Ok(())
        }
        None => Err(XmlError("more than one root element".into())),
    }
}

/// The klab tag inside an object's `<metadata>` (domain or network XML), matched by namespace URI.
pub fn owner_tag_in_object(xml: &str) -> Option<OwnerTag> {
    let root = parse(xml).ok()?;
    let metadata = root.child("metadata")?;
    metadata
        .children
        .iter()
        .find(|c| c.name == "lab" && c.ns.as_deref() == Some(OWNER_NS))
        .and_then(tag_from_element)
}

/// The tag as returned by `virDomainGetMetadata(ELEMENT, OWNER_NS)`: libvirt hands back the
/// element itself, usually without prefix or namespace declaration (the namespace was already
/// selected by the query). An element bound to some OTHER namespace is rejected.
pub fn owner_tag_from_metadata_element(xml: &str) -> Option<OwnerTag> {
    let root = parse(xml).ok()?;
    if root.name != "lab" {
        return None;
    }
    match root.ns.as_deref() {
        None => tag_from_element(&root),
        Some(ns) if ns == OWNER_NS => tag_from_element(&root),
        Some(_) => None,
    }
}

fn tag_from_element(element: &Element) -> Option<OwnerTag> {
    let lab = element.attr("name")?.trim();
    if lab.is_empty() {
        return None;
    }
    Some(OwnerTag {
        lab: lab.to_string(),
        node: element
            .attr("node")
            .map(str::to_string)
            .filter(|n| !n.is_empty()),
    })
}

/// The lab a pool tag volume names (`klab-owner-<lab>.tag`).
pub fn lab_from_tag_volume(volume: &str) -> Option<&str> {
    volume
        .strip_prefix("klab-owner-")
        .and_then(|rest| rest.strip_suffix(".tag"))
        .filter(|lab| !lab.is_empty())
}

/// `<name>` of a domain, network, pool or volume document.
pub fn object_name(xml: &str) -> Option<String> {
    parse(xml).ok()?.child_text("name")
}

/// A disk source of a domain: a file path or a pool/volume pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    File(String),
    Volume { pool: String, volume: String },
}

/// Every `<devices><disk><source …>` of a domain document, in order.
pub fn domain_disk_sources(xml: &str) -> Vec<DiskSource> {
    let Ok(root) = parse(xml) else {
        return Vec::new();
    };
    let Some(devices) = root.child("devices") else {
        return Vec::new();
    };
    devices
        .children_named("disk")
        .filter_map(|disk| disk.child("source"))
        .filter_map(|source| {
            if let Some(file) = source.attr("file").or_else(|| source.attr("dev")) {
                Some(DiskSource::File(file.to_string()))
            } else {
                match (source.attr("pool"), source.attr("volume")) {
                    (Some(pool), Some(volume)) => Some(DiskSource::Volume {
                        pool: pool.to_string(),
                        volume: volume.to_string(),
                    }),
                    _ => None,
                }
            }
        })
        .collect()
}

/// Networks named by `<interface type='network'><source network='…'/>` of a domain document.
pub fn domain_networks(xml: &str) -> Vec<String> {
    let Ok(root) = parse(xml) else {
        return Vec::new();
    };
    let Some(devices) = root.child("devices") else {
        return Vec::new();
    };
    devices
        .children_named("interface")
        .filter(|i| i.attr("type") == Some("network"))
        .filter_map(|i| i.child("source")?.attr("network").map(str::to_string))
        .collect()
}

/// A domain's `<interface type='network'>` as (network, bridge, host device) from its live XML.
pub fn domain_interfaces(xml: &str) -> Vec<(String, Option<String>, Option<String>)> {
    let Ok(root) = parse(xml) else {
        return Vec::new();
    };
    let Some(devices) = root.child("devices") else {
        return Vec::new();
    };
    devices
        .children_named("interface")
        .filter(|i| i.attr("type") == Some("network"))
        .filter_map(|i| {
            let source = i.child("source")?;
            let network = source.attr("network")?.to_string();
            let bridge = source.attr("bridge").map(str::to_string);
            let dev = i
                .child("target")
                .and_then(|t| t.attr("dev"))
                .map(str::to_string);
            Some((network, bridge, dev))
        })
        .collect()
}

/// Checks that `doc` defines the object the caller named, so a template mix-up cannot create
/// (and later delete) an object under an unexpected name.
pub fn check_name(
    op: &'static str,
    kind: &'static str,
    name: &str,
    doc: &str,
) -> Result<(), BackendError> {
    match parse(doc) {
        Err(e) => Err(BackendError::op(op, kind, name, e)),
        Ok(root) => match root.child_text("name") {
            Some(found) if found == name => Ok(()),
            Some(found) => Err(BackendError::op(
                op,
                kind,
                name,
                format!("the XML defines `{found}` instead"),
            )),
            None => Err(BackendError::op(op, kind, name, "the XML has no <name>")),
        },
    }
}

/// `<bridge name='…'/>` of a network document.
pub fn network_bridge(xml: &str) -> Option<String> {
    parse(xml)
        .ok()?
        .child("bridge")?
        .attr("name")
        .map(str::to_string)
        .filter(|b| !b.is_empty())
}

/// `<target><path>` of a pool document.
pub fn pool_target_path(xml: &str) -> Option<String> {
    parse(xml).ok()?.child("target")?.child_text("path")
}

/// Which domain types libvirt offers for x86_64 guests.
pub fn accel_from_capabilities(xml: &str) -> Result<AccelSupport, XmlError> {
    let root = parse(xml)?;
    let mut support = AccelSupport {
        kvm: false,
        qemu: false,
    };
    for guest in root.children_named("guest") {
        for arch in guest
            .children_named("arch")
            .filter(|a| a.attr("name") == Some("x86_64"))
        {
            for domain in arch.children_named("domain") {
                match domain.attr("type") {
                    Some("kvm") => support.kvm = true,
                    Some("qemu") => support.qemu = true,
                    _ => {}
                }
            }
        }
    }
    Ok(support)
}

/// Mode of every volume klab creates: seeds hold the node's SSH host private key. libvirt's dynamic
/// ownership (qemu.conf `dynamic_ownership = 1`, the default) chowns a disk to the qemu user while its
/// domain runs, so owner-only still lets QEMU open it.
pub const PRIVATE_VOLUME_MODE: u32 = 0o600;

/// XML for a zero-byte raw volume (the pool tag) or a raw volume of `capacity` bytes, owner-only.
pub fn raw_volume_xml(name: &str, capacity: u64) -> String {
    format!(
        "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity>\
         <allocation unit='bytes'>0</allocation><target><format type='raw'/>\
         <permissions><mode>{PRIVATE_VOLUME_MODE:04o}</mode></permissions></target></volume>",
        quick_xml::escape::escape(name)
    )
}

/// `<target><permissions><mode>` of a volume or pool description, as a number.
pub fn target_mode(xml: &str) -> Option<u32> {
    let mode = parse(xml)
        .ok()?
        .child("target")?
        .child("permissions")?
        .child_text("mode")?;
    u32::from_str_radix(mode.trim(), 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(lab: &str, node: Option<&str>) -> OwnerTag {
        OwnerTag {
            lab: lab.into(),
            node: node.map(Into::into),
        }
    }

    #[test]
    fn domain_tag_found_by_namespace_uri() {
        let xml = format!(
            "<domain type='qemu'><name>klab-demo-cp1</name><metadata>\
             <klab:lab xmlns:klab='{OWNER_NS}' name='demo' node='cp1'/></metadata></domain>"
        );
        assert_eq!(owner_tag_in_object(&xml), Some(tag("demo", Some("cp1"))));
    }

    #[test]
    fn other_prefix_same_uri_is_ours() {
        let xml = format!(
            "<network><name>n</name><metadata><x:lab xmlns:x=\"{OWNER_NS}\" name=\"demo\" \
             network=\"cluster\"/></metadata></network>"
        );
        assert_eq!(owner_tag_in_object(&xml), Some(tag("demo", None)));
    }

    #[test]
    fn klab_prefix_foreign_uri_is_not_ours() {
        let xml = "<network><name>klab-demo-cluster</name><metadata>\
                   <klab:lab xmlns:klab='https://example.com/other' name='demo'/>\
                   </metadata></network>";
        assert_eq!(owner_tag_in_object(xml), None);
    }

    #[test]
    fn unprefixed_lab_without_namespace_in_object_is_not_ours() {
        let xml = "<domain><name>x</name><metadata><lab name='demo'/></metadata></domain>";
        assert_eq!(owner_tag_in_object(xml), None);
    }

    #[test]
    fn tag_outside_metadata_is_ignored() {
        let xml = format!(
            "<domain><name>x</name><description><klab:lab xmlns:klab='{OWNER_NS}' \
             name='demo'/></description></domain>"
        );
        assert_eq!(owner_tag_in_object(&xml), None);
    }

    #[test]
    fn tag_without_lab_name_is_not_a_tag() {
        let xml = format!(
            "<domain><name>x</name><metadata><klab:lab xmlns:klab='{OWNER_NS}' name=''/>\
             </metadata></domain>"
        );
        assert_eq!(owner_tag_in_object(&xml), None);
    }

    #[test]
    fn metadata_element_as_libvirt_returns_it() {
        assert_eq!(
            owner_tag_from_metadata_element("<lab name=\"demo\" node=\"w1\"/>"),
            Some(tag("demo", Some("w1")))
        );
        let with_ns = format!("<klab:lab xmlns:klab='{OWNER_NS}' name='demo' node='w1'/>");
        assert_eq!(
            owner_tag_from_metadata_element(&with_ns),
            Some(tag("demo", Some("w1")))
        );
        assert_eq!(
            owner_tag_from_metadata_element("<k:lab xmlns:k='urn:other' name='demo'/>"),
            None
        );
        assert_eq!(
            owner_tag_from_metadata_element("<other name='demo'/>"),
            None
        );
        assert_eq!(owner_tag_from_metadata_element("not xml <"), None);
    }

    #[test]
    fn escaped_attribute_values_are_unescaped() {
        let xml = format!(
            "<domain><metadata><klab:lab xmlns:klab='{OWNER_NS}' name='a&amp;b' node='n'/>\
             </metadata></domain>"
        );
        assert_eq!(owner_tag_in_object(&xml), Some(tag("a&b", Some("n"))));
    }

    #[test]
    fn tag_volume_names() {
        assert_eq!(
            lab_from_tag_volume(&crate::backend::pool_tag_volume("demo")),
            Some("demo")
        );
        assert_eq!(lab_from_tag_volume("klab-owner-.tag"), None);
        assert_eq!(lab_from_tag_volume("cp1.qcow2"), None);
    }

    #[test]
    fn live_interfaces_name_network_bridge_and_device() {
        let x = "<domain><name>d</name><devices>\
            <interface type='network'><source network='n1' bridge='kl-a'/><target dev='vnet3'/></interface>\
            <interface type='network'><source network='n2'/></interface>\
            <interface type='bridge'><source bridge='br0'/></interface></devices></domain>";
        assert_eq!(
            domain_interfaces(x),
            vec![
                (
                    "n1".to_string(),
                    Some("kl-a".to_string()),
                    Some("vnet3".to_string())
                ),
                ("n2".to_string(), None, None),
            ]
        );
    }

    #[test]
    fn disks_bridge_pool_path_and_names() {
        let dom = "<domain><name> klab-demo-cp1 </name><devices>\
                   <disk type='volume'><source pool='klab-demo' volume='cp1.qcow2'/></disk>\
                   <disk type='file'><source file='/p/cp1-seed.img'/></disk>\
                   <disk type='file' device='cdrom'/>\
                   <interface type='network'><source network='n'/></interface>\
                   </devices></domain>";
        assert_eq!(object_name(dom).as_deref(), Some("klab-demo-cp1"));
        assert_eq!(
            domain_disk_sources(dom),
            vec![
                DiskSource::Volume {
                    pool: "klab-demo".into(),
                    volume: "cp1.qcow2".into()
                },
                DiskSource::File("/p/cp1-seed.img".into()),
            ]
        );
        assert_eq!(domain_networks(dom), vec!["n".to_string()]);
        let with_nics = "<domain><name>d</name><devices>\
                         <interface type='network'><source network='klab-demo-ext'/></interface>\
                         <interface type='bridge'><source bridge='br0'/></interface>\
                         </devices></domain>";
        assert_eq!(
            domain_networks(with_nics),
            vec!["klab-demo-ext".to_string()]
        );
        assert!(check_name("define", "domain", "d", with_nics).is_ok());
        let err = check_name("define", "domain", "e", with_nics).unwrap_err();
        assert!(err.to_string().contains("`e`") && err.to_string().contains("`d`"));
        assert!(check_name("define", "domain", "d", "<domain>").is_err());
        let net = "<network><name>n</name><bridge name='kl-0a1b2c3d' stp='on'/></network>";
        assert_eq!(network_bridge(net).as_deref(), Some("kl-0a1b2c3d"));
        assert_eq!(network_bridge("<network><name>n</name></network>"), None);
        let pool = "<pool type='dir'><name>p</name><target><path>/var/lib/klab/pools/demo</path>\
                    </target></pool>";
        assert_eq!(
            pool_target_path(pool).as_deref(),
            Some("/var/lib/klab/pools/demo")
        );
    }

    #[test]
    fn accel_from_capability_documents() {
        let caps = "<capabilities><host/><guest><os_type>hvm</os_type><arch name='i686'>\
                    <domain type='kvm'/></arch></guest><guest><os_type>hvm</os_type>\
                    <arch name='x86_64'><domain type='qemu'/></arch></guest></capabilities>";
        assert_eq!(
            accel_from_capabilities(caps).unwrap(),
            AccelSupport {
                kvm: false,
                qemu: true
            }
        );
        let both = "<capabilities><guest><arch name='x86_64'><domain type='qemu'/>\
                    <domain type='kvm'/></arch></guest></capabilities>";
        assert_eq!(
            accel_from_capabilities(both).unwrap(),
            AccelSupport {
                kvm: true,
                qemu: true
            }
        );
        assert!(accel_from_capabilities("<capabilities>").is_err());
    }

    #[test]
    fn malformed_documents_are_errors() {
        assert!(parse("<a><b></a>").is_err());
        assert!(parse("").is_err());
        assert!(parse("<a/><b/>").is_err());
    }

    #[test]
    fn raw_volume_xml_escapes_and_parses() {
        let xml = raw_volume_xml("a<b.img", 42);
        assert_eq!(object_name(&xml).as_deref(), Some("a<b.img"));
        assert!(xml.contains("<mode>0600</mode>"), "{xml}");
        assert_eq!(target_mode(&xml), Some(0o600));
    }

    #[test]
    fn target_mode_reads_libvirt_descriptions() {
        let vol = "<volume type='file'><name>cp1-seed.img</name><target><path>/p/cp1-seed.img</path>\
                   <permissions><mode>0644</mode><owner>0</owner><group>0</group></permissions>\
                   </target></volume>";
        assert_eq!(target_mode(vol), Some(0o644));
        assert_eq!(
            target_mode("<volume><name>x</name><target/></volume>"),
            None
        );
    }
}
