//! cloud-init NoCloud seed as a vfat image built in memory (FAT12, label `CIDATA`).
//! Deterministic: the same files give the same bytes (fixed timestamps, volume id from a hash
//! of the content), so a re-run can tell whether a seed changed.

use std::io::{Cursor, Write};

use fatfs::{
    Date, DateTime, FatType, FileSystem, FormatVolumeOptions, FsOptions, Time, TimeProvider,
};
use sha2::{Digest, Sha256};

const MIB: u64 = 1024 * 1024;
/// Seeds are a few KiB; anything near FAT12's limits is a caller bug.
const MAX_IMAGE: u64 = 64 * MIB;
const SECTOR: u64 = 512;
/// FAT12 allows at most 4084 clusters; stay clear of the boundary.
const MAX_CLUSTERS: u64 = 4000;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("seed file name `{0}` is not a plain file name")]
    InvalidName(String),
    #[error("seed file `{0}` is given twice")]
    Duplicate(String),
    #[error("seed files need {bytes} bytes, more than a seed image may hold")]
    TooLarge { bytes: u64 },
    #[error("cannot format the seed image")]
    Format(#[source] std::io::Error),
    #[error("cannot write `{file}` into the seed image")]
    Write {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// Every timestamp in the image is the DOS epoch (1980-01-01 00:00), never the clock.
#[derive(Debug)]
struct FixedTime;

impl TimeProvider for FixedTime {
    fn get_current_date(&self) -> Date {
        Date {
            year: 1980,
            month: 1,
            day: 1,
        }
    }

    fn get_current_date_time(&self) -> DateTime {
        DateTime {
            date: self.get_current_date(),
            time: Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

static FIXED_TIME: FixedTime = FixedTime;

/// Smallest cluster size (power of two, ≥ one sector) that keeps `size` within FAT12.
fn cluster_for(size: u64) -> u64 {
    let mut cluster = SECTOR;
    while size / cluster > MAX_CLUSTERS {
        cluster *= 2;
    }
    cluster
}

/// Image size: at least 1 MiB, in whole MiB, with room for every file's cluster slack plus
/// boot sector, two FATs and the root directory.
fn image_size(files: &[(&str, &[u8])]) -> Result<u64, SeedError> {
    let mut size = MIB;
    loop {
        let cluster = cluster_for(size);
        let data: u64 = files
            .iter()
            .map(|(_, content)| (content.len() as u64).div_ceil(cluster).max(1) * cluster)
            .sum();
        let fats = 2 * ((size / cluster) * 3 / 2 + SECTOR);
        let root_dir = 512 * 32;
        let need = data + fats + root_dir + 64 * 1024;
        if need <= size {
            return Ok(size);
        }
        if size >= MAX_IMAGE {
            return Err(SeedError::TooLarge { bytes: need });
        }
        size += MIB;
    }
}

fn volume_id(files: &[(&str, &[u8])]) -> u32 {
    let mut hash = Sha256::new();
    for (name, content) in files {
        // Length-prefixed so that ("ab","c") and ("a","bc") hash differently.
        hash.update((name.len() as u64).to_le_bytes());
        hash.update(name.as_bytes());
        hash.update((content.len() as u64).to_le_bytes());
        hash.update(content);
    }
    let digest = hash.finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Build a vfat image holding `files` in its root directory (e.g. `meta-data`, `user-data`,
/// `network-config`). Files are written in name order, so the input order does not matter.
pub fn build_vfat_seed(files: &[(&str, &[u8])]) -> Result<Vec<u8>, SeedError> {
    let mut sorted: Vec<(&str, &[u8])> = files.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for pair in sorted.windows(2) {
        if pair[0].0 == pair[1].0 {
            return Err(SeedError::Duplicate(pair[0].0.to_string()));
        }
    }
    for (name, _) in &sorted {
        let bad = name.is_empty()
            || *name == "."
            || *name == ".."
            || name.len() > 255
            || name
                .chars()
                .any(|c| matches!(c, '/' | '\\' | '\0') || c.is_control());
        if bad {
            return Err(SeedError::InvalidName(name.to_string()));
        }
    }

    let size = image_size(&sorted)?;
    let mut image = Cursor::new(vec![0u8; size as usize]);
    let options = FormatVolumeOptions::new()
        .fat_type(FatType::Fat12)
        .bytes_per_cluster(cluster_for(size) as u32)
        .volume_label(*b"CIDATA     ")
        .volume_id(volume_id(&sorted));
    fatfs::format_volume(&mut image, options).map_err(SeedError::Format)?;
    image.set_position(0);
    {
        let fs = FileSystem::new(&mut image, FsOptions::new().time_provider(&FIXED_TIME))
            .map_err(SeedError::Format)?;
        {
            let root = fs.root_dir();
            for (name, content) in &sorted {
                let write_err = |source| SeedError::Write {
                    file: name.to_string(),
                    source,
                };
                let mut file = root.create_file(name).map_err(write_err)?;
                file.truncate().map_err(write_err)?;
                file.write_all(content).map_err(write_err)?;
                file.flush().map_err(write_err)?;
            }
        }
        fs.unmount().map_err(SeedError::Format)?;
    }
    Ok(image.into_inner())
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn files() -> Vec<(&'static str, &'static [u8])> {
        vec![
            ("meta-data", b"instance-id: cp1\nlocal-hostname: cp1\n"),
            ("user-data", b"#cloud-config\nhostname: cp1\n"),
            ("network-config", b"version: 2\nethernets: {}\n"),
        ]
    }

    fn read_back(image: Vec<u8>) -> (String, u32, Vec<(String, Vec<u8>)>) {
        let fs = FileSystem::new(Cursor::new(image), FsOptions::new()).unwrap();
        let label = fs.volume_label();
        let id = fs.volume_id();
        let mut out = Vec::new();
        for entry in fs.root_dir().iter() {
            let entry = entry.unwrap();
            let mut data = Vec::new();
            entry.to_file().read_to_end(&mut data).unwrap();
            out.push((entry.file_name(), data));
        }
        (label, id, out)
    }

    #[test]
    fn files_label_and_id_round_trip() {
        let image = build_vfat_seed(&files()).unwrap();
        assert_eq!(image.len() as u64, MIB);
        let (label, id, read) = read_back(image);
        assert_eq!(label.trim_end(), "CIDATA");
        // sha256 over the length-prefixed (name, content) pairs in name order, computed outside klab.
        assert_eq!(id, 0x106e_c7f5);
        let mut expected = files();
        expected.sort_by(|a, b| a.0.cmp(b.0));
        let expected: Vec<(String, Vec<u8>)> = expected
            .into_iter()
            .map(|(n, c)| (n.to_string(), c.to_vec()))
            .collect();
        assert_eq!(read, expected);
    }

    #[test]
    fn same_files_same_bytes_any_order() {
        let a = build_vfat_seed(&files()).unwrap();
        let mut reversed = files();
        reversed.reverse();
        let b = build_vfat_seed(&reversed).unwrap();
        assert!(a == b, "seed bytes differ between builds");
    }

    #[test]
    fn content_change_changes_volume_id() {
        let mut changed = files();
        changed[1].1 = b"#cloud-config\nhostname: cp2\n";
        let (_, a, _) = read_back(build_vfat_seed(&files()).unwrap());
        let (_, b, _) = read_back(build_vfat_seed(&changed).unwrap());
        assert_ne!(a, b);
    }

    #[test]
    fn large_files_grow_the_image() {
        let big = vec![7u8; 3 * MIB as usize];
        let image = build_vfat_seed(&[("user-data", &big), ("meta-data", b"x")]).unwrap();
        assert!(image.len() as u64 > 3 * MIB);
        assert_eq!(image.len() as u64 % MIB, 0);
        let (_, _, read) = read_back(image);
        assert_eq!(read[1].1, big);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(matches!(
            build_vfat_seed(&[("a", b"1"), ("a", b"2")]),
            Err(SeedError::Duplicate(_))
        ));
        assert!(matches!(
            build_vfat_seed(&[("dir/x", b"1")]),
            Err(SeedError::InvalidName(_))
        ));
        let huge = vec![0u8; 70 * MIB as usize];
        assert!(matches!(
            build_vfat_seed(&[("user-data", &huge)]),
            Err(SeedError::TooLarge { .. })
        ));
    }

    #[test]
    fn cluster_size_keeps_fat12() {
        assert_eq!(cluster_for(MIB), 512);
        for mib in 1..=64 {
            assert!(mib * MIB / cluster_for(mib * MIB) <= MAX_CLUSTERS);
        }
    }
}
