//! A minimal `newc` cpio writer. The fixture appends one such archive (the agent binary) to the
//! cached guest initramfs; the kernel unpacks concatenated archives in order, so the guest gets
//! the agent of this very build without rebuilding the image.

use std::io::{self, Write};

/// Writes `files` (path inside the guest, mode, contents) followed by the trailer.
pub fn write_archive(out: &mut impl Write, files: &[(&str, u32, &[u8])]) -> io::Result<()> {
    let mut written = 0usize;
    for (inode, (path, mode, data)) in (1u32..).zip(files) {
        written += write_entry(out, inode, path, *mode, data)?;
    }
    written += write_entry(out, 0, "TRAILER!!!", 0, &[])?;
    // Pad to a 512-byte block like cpio(1) does, so another archive may follow.
    let pad = (512 - written % 512) % 512;
    out.write_all(&vec![0u8; pad])
}

fn write_entry(
    out: &mut impl Write,
    inode: u32,
    path: &str,
    mode: u32,
    data: &[u8],
) -> io::Result<usize> {
    let size = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB"))?;
    let name_len = path.len() + 1;
    let fields = [
        inode,
        mode,
        0,
        0,
        1,
        0,
        size,
        0,
        0,
        0,
        0,
        name_len as u32,
        0,
    ];
    let mut header = String::from("070701");
    for field in fields {
        header.push_str(&format!("{field:08x}"));
    }
    out.write_all(header.as_bytes())?;
    out.write_all(path.as_bytes())?;
    out.write_all(&[0])?;
    let name_end = header.len() + name_len;
    let name_pad = (4 - name_end % 4) % 4;
    out.write_all(&[0u8; 3][..name_pad])?;
    out.write_all(data)?;
    let data_pad = (4 - data.len() % 4) % 4;
    out.write_all(&[0u8; 3][..data_pad])?;
    Ok(name_end + name_pad + data.len() + data_pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_has_aligned_entries_and_a_trailer() {
        let mut out = Vec::new();
        write_archive(&mut out, &[("usr/bin/x", 0o100755, b"abcde")]).unwrap();
        assert_eq!(out.len() % 512, 0);
        assert!(out.starts_with(b"070701"));
        // Header (110) + "usr/bin/x\0" (10) = 120, already aligned; data padded to 8.
        assert_eq!(&out[110..120], b"usr/bin/x\0");
        assert_eq!(&out[120..125], b"abcde");
        assert_eq!(&out[128..134], b"070701");
        let trailer = String::from_utf8_lossy(&out[128 + 110..128 + 120]);
        assert_eq!(trailer, "TRAILER!!!");
        // Mode and size fields of the first header.
        assert_eq!(&out[14..22], b"000081ed");
        assert_eq!(&out[54..62], b"00000005");
    }
}
