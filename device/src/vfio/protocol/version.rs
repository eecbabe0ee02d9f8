//! VERSION negotiation: parsing the client's capability JSON and building
//! our answer (QEMU's vfio-user specification, VFIO_USER_VERSION).
//!
//! The crate unwrapped `CString::from_vec_with_nul` on this string and
//! panicked on anything not NUL-terminated (bug F). Here every malformation
//! is an error the handler turns into EINVAL.

use serde_json::{Map, Value};
use thiserror::Error;

use super::{DMA_PGSIZES, MAX_DATA_XFER_SIZE, MAX_DMA_MAPS, MAX_MSG_FDS, MAX_VERSION_DATA};

/// Capabilities we answer when offered, each with our own value. The reply
/// must be a subset of the offer, so unoffered keys are left out.
/// `write_multiple`, `twin_socket` and `migration` are never answered: we
/// implement none of them.
const OUR_NUMBERS: [(&str, u64); 4] = [
    ("max_msg_fds", MAX_MSG_FDS as u64),
    ("max_data_xfer_size", MAX_DATA_XFER_SIZE as u64),
    ("pgsizes", DMA_PGSIZES),
    ("max_dma_maps", MAX_DMA_MAPS as u64),
];

/// Why the client's version data was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub(super) enum VersionDataError {
    /// More than [`MAX_VERSION_DATA`] bytes.
    #[error("version data of {0} bytes exceeds {MAX_VERSION_DATA}")]
    TooLong(usize),
    /// The string does not end with NUL.
    #[error("version data is not NUL-terminated")]
    NoNul,
    /// A NUL before the end.
    #[error("version data has an embedded NUL")]
    EmbeddedNul,
    /// Not UTF-8.
    #[error("version data is not UTF-8")]
    NotUtf8,
    /// Not JSON.
    #[error("version data is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object where one is required.
    #[error("{0} is not a JSON object")]
    NotObject(&'static str),
    /// A known capability with a value of the wrong type.
    #[error("capability {0} has a malformed value")]
    Malformed(String),
}

/// What we keep of the client's offer.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Offer {
    /// Most descriptors the client can receive in one message (default 1).
    pub max_msg_fds: u64,
    /// Capability names the client listed.
    offered: Vec<String>,
}

impl Default for Offer {
    fn default() -> Self {
        Self {
            max_msg_fds: 1,
            offered: Vec::new(),
        }
    }
}

/// Parses the version data after major/minor: optional, else a
/// NUL-terminated UTF-8 JSON object with an optional `capabilities` object.
pub(super) fn parse_offer(data: &[u8]) -> Result<Offer, VersionDataError> {
    if data.is_empty() {
        return Ok(Offer::default());
    }
    if data.len() > MAX_VERSION_DATA {
        return Err(VersionDataError::TooLong(data.len()));
    }
    let Some((0, text)) = data.split_last() else {
        return Err(VersionDataError::NoNul);
    };
    if text.contains(&0) {
        return Err(VersionDataError::EmbeddedNul);
    }
    let text = std::str::from_utf8(text).map_err(|_| VersionDataError::NotUtf8)?;
    // serde_json bounds its recursion, so deep nesting is an error, not a
    // stack overflow.
    let root: Value =
        serde_json::from_str(text).map_err(|e| VersionDataError::NotJson(e.to_string()))?;
    let root = root
        .as_object()
        .ok_or(VersionDataError::NotObject("version data"))?;
    let Some(caps) = root.get("capabilities") else {
        return Ok(Offer::default());
    };
    let caps = caps
        .as_object()
        .ok_or(VersionDataError::NotObject("capabilities"))?;
    check_types(caps)?;
    let max_msg_fds = caps.get("max_msg_fds").and_then(Value::as_u64).unwrap_or(1);
    Ok(Offer {
        max_msg_fds,
        offered: caps.keys().cloned().collect(),
    })
}

/// Refuses known capabilities whose values have the wrong JSON type, as
/// QEMU does for the server's reply. Unknown keys are ignored.
fn check_types(caps: &Map<String, Value>) -> Result<(), VersionDataError> {
    for (key, value) in caps {
        let ok = match key.as_str() {
            "max_msg_fds" | "max_data_xfer_size" | "pgsizes" | "max_dma_maps" => {
                value.as_u64().is_some()
            }
            "write_multiple" => value.is_boolean(),
            "twin_socket" | "migration" => value.is_object(),
            _ => true,
        };
        if !ok {
            return Err(VersionDataError::Malformed(key.clone()));
        }
    }
    Ok(())
}

/// Our version data for `offer`: `{"capabilities":{...}}` plus the NUL.
///
/// Short by construction (four numbers at most, about 100 bytes): QEMU
/// rejects a VERSION reply longer than its own request (QEMU's vfio-user specification, "Header").
pub(super) fn reply_data(offer: &Offer) -> Vec<u8> {
    let mut caps = Map::new();
    for (name, value) in OUR_NUMBERS {
        if offer.offered.iter().any(|key| key == name) {
            caps.insert(name.to_owned(), Value::from(value));
        }
    }
    let mut root = Map::new();
    root.insert("capabilities".to_owned(), Value::Object(caps));
    let mut data = Value::Object(root).to_string().into_bytes();
    data.push(0);
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 11.1.3's offer, verbatim from the wire (QEMU's vfio-user specification, VFIO_USER_VERSION).
    const QEMU_OFFER: &str = r#"{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, "max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, "pgsize": 4096}, "write_multiple": true}}"#;

    fn nul(text: &str) -> Vec<u8> {
        let mut data = text.as_bytes().to_vec();
        data.push(0);
        data
    }

    fn reply_json(data: &[u8]) -> Value {
        let (last, text) = data.split_last().expect("non-empty");
        assert_eq!(*last, 0, "NUL-terminated");
        serde_json::from_slice(text).expect("valid JSON")
    }

    #[test]
    fn qemu_offer_gets_a_short_subset() {
        let offer = parse_offer(&nul(QEMU_OFFER)).expect("QEMU's offer parses");
        assert_eq!(offer.max_msg_fds, 16);
        let data = reply_data(&offer);
        // QEMU's request is 214 bytes with header and major/minor.
        assert!(16 + 4 + data.len() <= 214, "{} bytes", data.len());
        let json = reply_json(&data);
        let caps = json["capabilities"].as_object().expect("object");
        assert_eq!(caps.len(), 4);
        assert_eq!(caps["max_msg_fds"], 16);
        assert_eq!(caps["max_data_xfer_size"], 1_048_576);
        assert_eq!(caps["pgsizes"], 4096);
        assert_eq!(caps["max_dma_maps"], 256);
        for absent in ["write_multiple", "migration", "twin_socket"] {
            assert!(
                !caps.contains_key(absent),
                "{absent} must not be advertised"
            );
        }
    }

    #[test]
    fn reply_is_a_subset_of_the_offer() {
        let offer =
            parse_offer(&nul(r#"{"capabilities":{"max_msg_fds":1,"x-vendor":[1]}}"#)).expect("ok");
        assert_eq!(offer.max_msg_fds, 1);
        let json = reply_json(&reply_data(&offer));
        assert_eq!(
            json,
            serde_json::json!({"capabilities": {"max_msg_fds": 16}})
        );
        for empty in [&b""[..], b"{}\0", b"{\"other\":1}\0"] {
            let offer = parse_offer(empty).expect("no capabilities");
            assert_eq!(offer, Offer::default());
            assert_eq!(reply_data(&offer), b"{\"capabilities\":{}}\0");
        }
    }

    #[test]
    fn malformed_offers_are_errors() {
        let long = nul(&format!("{{\"pad\":\"{}\"}}", "x".repeat(MAX_VERSION_DATA)));
        let cases: [(&[u8], VersionDataError); 4] = [
            (b"{}", VersionDataError::NoNul),
            (b"{}\0{}\0", VersionDataError::EmbeddedNul),
            (b"{\"a\":\"\xff\"}\0", VersionDataError::NotUtf8),
            (&long, VersionDataError::TooLong(long.len())),
        ];
        for (data, expected) in cases {
            assert_eq!(parse_offer(data), Err(expected));
        }
        for bad in [
            "not json",
            "{\"capabilities\":",
            "[1,2]",
            "{\"capabilities\":[]}",
            "{\"capabilities\":{\"max_msg_fds\":\"16\"}}",
            "{\"capabilities\":{\"max_msg_fds\":-1}}",
            "{\"capabilities\":{\"pgsizes\":4096.5}}",
            "{\"capabilities\":{\"write_multiple\":1}}",
            "{\"capabilities\":{\"migration\":true}}",
            &format!("{}{}", "[".repeat(1000), "]".repeat(1000)),
        ] {
            assert!(parse_offer(&nul(bad)).is_err(), "{bad:.40} must be refused");
        }
    }
}
