//! A minimal, deterministic ISO 9660 writer for the NoCloud seed Hyper-V mounts as a DVD: volume
//! label `CIDATA`, a flat root directory, and a Joliet tree so Linux sees the exact lowercase names
//! (`meta-data`, `user-data`, `network-config`). Primary-tree names are the ISO 9660 level 2 forms
//! (`META_DATA.;1`). Dates are left "not specified", so the same files give the same bytes.

const SECTOR: usize = 2048;
/// System area, then PVD (16), Joliet SVD (17), terminator (18), path tables (19–22), roots (23, 24).
const PVD: usize = 16;
const SVD: usize = 17;
const TERM: usize = 18;
const PT_L: usize = 19;
const PT_M: usize = 20;
const JPT_L: usize = 21;
const JPT_M: usize = 22;
const ROOT: usize = 23;
const JROOT: usize = 24;
const FIRST_FILE: usize = 25;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IsoError {
    #[error("seed file name `{0}` must be 1 to 30 characters of a-z, 0-9, `-`, `_` or `.`")]
    Name(String),
    #[error("the seed's files do not fit one root directory sector")]
    TooManyFiles,
    #[error("seed file `{0}` is larger than 4 GiB")]
    TooLarge(String),
}

fn both16(v: u16) -> [u8; 4] {
    let l = v.to_le_bytes();
    let b = v.to_be_bytes();
    [l[0], l[1], b[0], b[1]]
}

fn both32(v: u32) -> [u8; 8] {
    let l = v.to_le_bytes();
    let b = v.to_be_bytes();
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_be_bytes).collect()
}

/// A directory record (ECMA-119 9.1); dates all zero = not specified.
fn dir_record(lba: u32, len: u32, dir: bool, name: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8; 33];
    r[2..10].copy_from_slice(&both32(lba));
    r[10..18].copy_from_slice(&both32(len));
    r[25] = if dir { 2 } else { 0 };
    r[28..32].copy_from_slice(&both16(1));
    r[32] = name.len() as u8;
    r.extend_from_slice(name);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r[0] = r.len() as u8;
    r
}

fn pad_field(out: &mut [u8], text: &[u8], fill: &[u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = text
            .get(i)
            .copied()
            .unwrap_or_else(|| fill[(i - text.len()) % fill.len()]);
    }
}

fn volume_descriptor(joliet: bool, total: u32, pt_l: usize, pt_m: usize, root: usize) -> Vec<u8> {
    let mut d = vec![0u8; SECTOR];
    d[0] = if joliet { 2 } else { 1 };
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    let (space, label): (&[u8], Vec<u8>) = if joliet {
        (&[0x00, 0x20], ucs2("CIDATA"))
    } else {
        (b" ", b"CIDATA".to_vec())
    };
    pad_field(&mut d[8..40], &[], space);
    pad_field(&mut d[40..72], &label, space);
    d[80..88].copy_from_slice(&both32(total));
    if joliet {
        // UCS-2 level 3.
        d[88..91].copy_from_slice(b"%/E");
    }
    d[120..124].copy_from_slice(&both16(1));
    d[124..128].copy_from_slice(&both16(1));
    d[128..132].copy_from_slice(&both16(SECTOR as u16));
    d[132..140].copy_from_slice(&both32(10));
    d[140..144].copy_from_slice(&(pt_l as u32).to_le_bytes());
    d[148..152].copy_from_slice(&(pt_m as u32).to_be_bytes());
    d[156..190].copy_from_slice(&dir_record(root as u32, SECTOR as u32, true, &[0]));
    for range in [
        190..318,
        318..446,
        446..574,
        574..702,
        702..739,
        739..776,
        776..813,
    ] {
        pad_field(&mut d[range], &[], space);
    }
    // Four dates, "not specified": sixteen ASCII zeros and a zero offset.
    for start in [813, 830, 847, 864] {
        d[start..start + 16].copy_from_slice(b"0000000000000000");
    }
    d[881] = 1;
    d
}

fn path_table(root: usize, big_endian: bool) -> Vec<u8> {
    let mut t = vec![0u8; SECTOR];
    t[0] = 1;
    let lba = root as u32;
    t[2..6].copy_from_slice(&if big_endian {
        lba.to_be_bytes()
    } else {
        lba.to_le_bytes()
    });
    t[6..8].copy_from_slice(&if big_endian {
        1u16.to_be_bytes()
    } else {
        1u16.to_le_bytes()
    });
    t
}

fn valid_name(n: &str) -> bool {
    (1..=30).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// Primary-tree name: upper case, `-` → `_`, a `.` and version `;1`.
fn primary_name(n: &str) -> Vec<u8> {
    let mut s: String = n
        .chars()
        .map(|c| match c {
            '-' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect();
    if !s.contains('.') {
        s.push('.');
    }
    s.push_str(";1");
    s.into_bytes()
}

/// The ISO image of `files` (name, content). Directory records are sorted by name (ECMA-119 9.3).
pub fn build_cidata_iso(files: &[(&str, &[u8])]) -> Result<Vec<u8>, IsoError> {
    let mut files = files.to_vec();
    files.sort_by(|a, b| a.0.cmp(b.0));
    let files = files.as_slice();
    let mut lbas = Vec::new();
    let mut next = FIRST_FILE;
    for (name, data) in files {
        if !valid_name(name) {
            return Err(IsoError::Name((*name).to_string()));
        }
        if data.len() > u32::MAX as usize {
            return Err(IsoError::TooLarge((*name).to_string()));
        }
        lbas.push(next);
        next += data.len().div_ceil(SECTOR).max(1);
    }
    let total = next;
    let mut img = vec![0u8; total * SECTOR];
    let put = |img: &mut Vec<u8>, sector: usize, bytes: &[u8]| {
        img[sector * SECTOR..sector * SECTOR + bytes.len()].copy_from_slice(bytes);
    };
    put(
        &mut img,
        PVD,
        &volume_descriptor(false, total as u32, PT_L, PT_M, ROOT),
    );
    put(
        &mut img,
        SVD,
        &volume_descriptor(true, total as u32, JPT_L, JPT_M, JROOT),
    );
    let mut term = vec![0u8; 7];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    term[6] = 1;
    put(&mut img, TERM, &term);
    put(&mut img, PT_L, &path_table(ROOT, false));
    put(&mut img, PT_M, &path_table(ROOT, true));
    put(&mut img, JPT_L, &path_table(JROOT, false));
    put(&mut img, JPT_M, &path_table(JROOT, true));
    for (root, joliet) in [(ROOT, false), (JROOT, true)] {
        let mut dir = dir_record(root as u32, SECTOR as u32, true, &[0]);
        dir.extend(dir_record(root as u32, SECTOR as u32, true, &[1]));
        for ((name, data), lba) in files.iter().zip(&lbas) {
            let id = if joliet {
                ucs2(name)
            } else {
                primary_name(name)
            };
            dir.extend(dir_record(*lba as u32, data.len() as u32, false, &id));
        }
        if dir.len() > SECTOR {
            return Err(IsoError::TooManyFiles);
        }
        put(&mut img, root, &dir);
    }
    for ((_, data), lba) in files.iter().zip(&lbas) {
        put(&mut img, *lba, data);
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Vec<u8> {
        build_cidata_iso(&[
            ("meta-data", b"instance-id: i-1\n"),
            ("user-data", b"#cloud-config\n"),
            ("network-config", b"version: 2\n"),
        ])
        .unwrap()
    }

    /// Read a root directory back: (name, lba, length).
    fn list(img: &[u8], root: usize, joliet: bool) -> Vec<(String, usize, usize)> {
        let dir = &img[root * SECTOR..(root + 1) * SECTOR];
        let mut out = Vec::new();
        let mut i = 0;
        while i < dir.len() && dir[i] != 0 {
            let len = dir[i] as usize;
            let lba = u32::from_le_bytes(dir[i + 2..i + 6].try_into().unwrap()) as usize;
            let size = u32::from_le_bytes(dir[i + 10..i + 14].try_into().unwrap()) as usize;
            let n = dir[i + 32] as usize;
            let id = &dir[i + 33..i + 33 + n];
            let name = if n == 1 && id[0] < 2 {
                ".".repeat(id[0] as usize + 1)
            } else if joliet {
                let u: Vec<u16> = id
                    .chunks(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16(&u).unwrap()
            } else {
                String::from_utf8(id.to_vec()).unwrap()
            };
            out.push((name, lba, size));
            i += len;
        }
        out
    }

    #[test]
    fn layout_label_and_both_trees() {
        let img = seed();
        assert_eq!(img.len(), 28 * SECTOR);
        assert_eq!(&img[PVD * SECTOR..PVD * SECTOR + 6], b"\x01CD001");
        assert_eq!(&img[SVD * SECTOR..SVD * SECTOR + 6], b"\x02CD001");
        assert_eq!(&img[TERM * SECTOR..TERM * SECTOR + 6], b"\xffCD001");
        assert_eq!(
            &img[PVD * SECTOR + 40..PVD * SECTOR + 72],
            b"CIDATA                          "
        );
        assert_eq!(&img[SVD * SECTOR + 88..SVD * SECTOR + 91], b"%/E");
        assert_eq!(
            list(&img, JROOT, true),
            vec![
                (".".to_string(), JROOT, SECTOR),
                ("..".to_string(), JROOT, SECTOR),
                ("meta-data".to_string(), 25, 17),
                ("network-config".to_string(), 26, 11),
                ("user-data".to_string(), 27, 14),
            ]
        );
        let primary: Vec<String> = list(&img, ROOT, false).into_iter().map(|e| e.0).collect();
        assert_eq!(
            primary,
            [
                ".",
                "..",
                "META_DATA.;1",
                "NETWORK_CONFIG.;1",
                "USER_DATA.;1"
            ]
        );
        assert_eq!(&img[26 * SECTOR..26 * SECTOR + 11], b"version: 2\n");
        // Deterministic: the same files give the same bytes.
        assert_eq!(img, seed());
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(
            build_cidata_iso(&[("Meta Data", b"x")]),
            Err(IsoError::Name("Meta Data".into()))
        );
        assert_eq!(
            build_cidata_iso(&[("", b"x")]),
            Err(IsoError::Name(String::new()))
        );
    }
}

/// The seed as Hyper-V needs it. The executor builds the vfat CIDATA image libvirt attaches; Hyper-V
/// attaches only ISO (or VHD/VHDX), so a FAT image is read back and rewritten as ISO 9660 with the
/// same files. An ISO passes through unchanged.
pub fn seed_as_iso(data: &[u8]) -> Result<Vec<u8>, String> {
    if data.len() > 16 * SECTOR + 6 && &data[16 * SECTOR + 1..16 * SECTOR + 6] == b"CD001" {
        return Ok(data.to_vec());
    }
    use std::io::Read;
    let fs = fatfs::FileSystem::new(std::io::Cursor::new(data.to_vec()), fatfs::FsOptions::new())
        .map_err(|e| format!("the seed is neither ISO 9660 nor a FAT image: {e}"))?;
    let mut files = Vec::new();
    for entry in fs.root_dir().iter() {
        let entry = entry.map_err(|e| format!("reading the FAT seed: {e}"))?;
        if !entry.is_file() {
            continue;
        }
        let mut content = Vec::new();
        entry
            .to_file()
            .read_to_end(&mut content)
            .map_err(|e| format!("reading `{}` from the FAT seed: {e}", entry.file_name()))?;
        files.push((entry.file_name(), content));
    }
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, c)| (n.as_str(), c.as_slice()))
        .collect();
    build_cidata_iso(&refs).map_err(|e| e.to_string())
}

#[cfg(test)]
mod seed_tests {
    use super::*;

    #[test]
    fn a_vfat_seed_becomes_the_same_files_as_iso() {
        let files: [(&str, &[u8]); 3] = [
            ("meta-data", b"instance-id: i-1\n"),
            ("user-data", b"#cloud-config\n"),
            ("network-config", b"version: 2\n"),
        ];
        let vfat = crate::seed::build_vfat_seed(&files).unwrap();
        let iso = seed_as_iso(&vfat).unwrap();
        assert_eq!(iso, build_cidata_iso(&files).unwrap());
        // ISO in, same ISO out.
        assert_eq!(seed_as_iso(&iso).unwrap(), iso);
        assert!(
            seed_as_iso(b"not a filesystem")
                .unwrap_err()
                .starts_with("the seed is neither ISO 9660 nor a FAT image")
        );
    }
}
