//! Built-in image catalog: official cloud images by short name. Pure data.
//!
//! The URLs point at each distribution's "latest" build, so the checksum is read from the checksum file
//! published next to it at download time (Debian publishes SHA-512 sums, the others SHA-256).

use crate::model::OsFamily;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumKind {
    Sha256,
    Sha512,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogImage {
    pub name: &'static str,
    pub family: OsFamily,
    pub url: &'static str,
    /// Published checksum list (`<hex>  <file name>` lines, or BSD style `SHA256 (file) = hex`).
    pub checksum_url: &'static str,
    pub checksum_kind: ChecksumKind,
    /// The distribution's own default user (klab creates its own user; this is informational).
    pub distro_user: &'static str,
}

pub const CATALOG: &[CatalogImage] = &[
    CatalogImage {
        name: "debian-12",
        family: OsFamily::Debian,
        url: "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2",
        checksum_url: "https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS",
        checksum_kind: ChecksumKind::Sha512,
        distro_user: "debian",
    },
    CatalogImage {
        name: "ubuntu-24.04",
        family: OsFamily::Ubuntu,
        url: "https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img",
        checksum_url: "https://cloud-images.ubuntu.com/noble/current/SHA256SUMS",
        checksum_kind: ChecksumKind::Sha256,
        distro_user: "ubuntu",
    },
    CatalogImage {
        name: "almalinux-9",
        family: OsFamily::Alma,
        url: "https://repo.almalinux.org/almalinux/9/cloud/x86_64/images/AlmaLinux-9-GenericCloud-latest.x86_64.qcow2",
        checksum_url: "https://repo.almalinux.org/almalinux/9/cloud/x86_64/images/CHECKSUM",
        checksum_kind: ChecksumKind::Sha256,
        distro_user: "almalinux",
    },
];

pub fn lookup(name: &str) -> Option<&'static CatalogImage> {
    CATALOG.iter().find(|c| c.name == name)
}

pub fn names() -> impl Iterator<Item = &'static str> {
    CATALOG.iter().map(|c| c.name)
}
