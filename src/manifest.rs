//! Reading references out of OCI and Docker manifests and indexes.
//!
//! Parsing is deliberately loose about shape (a `serde_json::Value`, not typed structs): a GC
//! must find every reference in documents written by many tools, including media types it has
//! never heard of, and must never drop a reference because an unrelated field looked odd.

use serde_json::Value;

use crate::digest::Digest;

/// Largest manifest ocigc reads; the distribution spec tells registries to accept 4 MiB.
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// A reference to content: media type, digest and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Declared media type, if any.
    pub media_type: Option<String>,
    /// Content digest.
    pub digest: Digest,
    /// Declared size, if any.
    pub size: Option<u64>,
}

/// What a descriptor's media type says about the content it points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentKind {
    /// A manifest or index: it must be read, and failing to read it fails the repository.
    Manifest,
    /// A layer or config: never read.
    Blob,
    /// Unknown: read it if it is small and could be JSON, and follow what it references.
    Unknown,
}

/// The media type ocigc gives a root that is known to be a manifest or index of unknown kind
/// (a distribution revision link names only a digest): it must be read, and failing to read it
/// fails the repository closed, as for any manifest.
pub const UNTYPED_MANIFEST: &str = "application/vnd.ocigc.untyped-manifest";

const MANIFEST_TYPES: &[&str] = &[
    UNTYPED_MANIFEST,
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.artifact.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

const BLOB_TYPE_PREFIXES: &[&str] = &[
    "application/vnd.oci.image.layer.",
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.oci.empty.v1+json",
    "application/vnd.docker.image.rootfs.",
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.docker.plugin.v1+json",
];

/// Classifies a media type.
pub fn content_kind(media_type: Option<&str>) -> ContentKind {
    match media_type {
        Some(mt) if MANIFEST_TYPES.contains(&mt) => ContentKind::Manifest,
        Some(mt) if BLOB_TYPE_PREFIXES.iter().any(|p| mt.starts_with(p)) => ContentKind::Blob,
        _ => ContentKind::Unknown,
    }
}

/// Whether content of this kind and size is worth reading to look for references.
pub fn should_read(kind: ContentKind, media_type: Option<&str>, size: Option<u64>) -> bool {
    match kind {
        ContentKind::Manifest => true,
        ContentKind::Blob => false,
        ContentKind::Unknown => {
            let small = size.is_none_or(|s| s <= MAX_MANIFEST_SIZE);
            // Archives and binaries are never manifests; anything JSON-ish or untyped may be.
            let jsonish =
                media_type.is_none_or(|mt| mt.contains("json") || mt.contains("manifest"));
            small && jsonish
        }
    }
}

/// The references found in one document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct References {
    /// Everything the document points at: manifests, config, layers, blobs, subject.
    pub children: Vec<Descriptor>,
    /// The `subject`, when the document is a referrer.
    pub subject: Option<Descriptor>,
    /// Digests in non-manifest slots that ocigc cannot parse (kept, reported).
    pub unsupported: Vec<String>,
}

/// Why a document could not be read as a manifest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// Not JSON, or not a JSON object.
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// A descriptor that must be followed is malformed.
    #[error("bad descriptor in {field}: {reason}")]
    BadDescriptor { field: &'static str, reason: String },
}

fn descriptor(v: &Value, field: &'static str) -> Result<Descriptor, ManifestError> {
    let bad = |reason: String| ManifestError::BadDescriptor { field, reason };
    let obj = v.as_object().ok_or_else(|| bad("not an object".into()))?;
    let raw = obj
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no digest".into()))?;
    let digest = Digest::parse(raw).ok_or_else(|| bad(format!("unsupported digest {raw:?}")))?;
    Ok(Descriptor {
        media_type: obj
            .get("mediaType")
            .and_then(Value::as_str)
            .map(str::to_string),
        digest,
        size: obj.get("size").and_then(Value::as_u64),
    })
}

/// Whether a JSON object document has a `manifests` array (an image index), read without
/// building the document in memory.
pub fn has_manifests_array(body: &[u8]) -> Result<bool, ManifestError> {
    use serde::de::{IgnoredAny, SeqAccess, Visitor};
    /// `true` for an array (its elements skipped), `false` for any other value.
    struct IsArray(bool);
    impl<'de> serde::Deserialize<'de> for IsArray {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = IsArray;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<IsArray, A::Error> {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(IsArray(true))
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<IsArray, A::Error> {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(IsArray(false))
                }
                fn visit_bool<E>(self, _: bool) -> Result<IsArray, E> {
                    Ok(IsArray(false))
                }
                fn visit_i64<E>(self, _: i64) -> Result<IsArray, E> {
                    Ok(IsArray(false))
                }
                fn visit_u64<E>(self, _: u64) -> Result<IsArray, E> {
                    Ok(IsArray(false))
                }
                fn visit_f64<E>(self, _: f64) -> Result<IsArray, E> {
                    Ok(IsArray(false))
                }
                fn visit_str<E>(self, _: &str) -> Result<IsArray, E> {
                    Ok(IsArray(false))
                }
                fn visit_unit<E>(self) -> Result<IsArray, E> {
                    Ok(IsArray(false))
                }
            }
            d.deserialize_any(V)
        }
    }
    // Duplicate keys: the last one counts, as in Go; a case variant counts too (Go matches
    // field names case-insensitively).
    let fields: std::collections::HashMap<String, IsArray> =
        serde_json::from_slice(body).map_err(|e| ManifestError::NotJson(e.to_string()))?;
    Ok(fields
        .iter()
        .any(|(k, v)| v.0 && k.eq_ignore_ascii_case("manifests")))
}

/// Extracts every reference from a manifest, index or unknown JSON document.
///
/// Entries of `manifests` and the `subject` must be well-formed (their targets have to be
/// followed); a malformed digest in `config`, `layers`, `blobs` or `fsLayers` is only recorded,
/// because a blob ocigc cannot name is also a blob it never deletes.
pub fn references(body: &[u8]) -> Result<References, ManifestError> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| ManifestError::NotJson(e.to_string()))?;
    let obj = doc
        .as_object()
        .ok_or_else(|| ManifestError::NotJson("top level is not an object".into()))?;
    let mut refs = References::default();

    if let Some(list) = obj.get("manifests").and_then(Value::as_array) {
        for v in list {
            refs.children.push(descriptor(v, "manifests")?);
        }
    }
    if let Some(v) = obj.get("subject").filter(|v| !v.is_null()) {
        let d = descriptor(v, "subject")?;
        refs.subject = Some(d.clone());
        refs.children.push(d);
    }
    let mut soft = |v: &Value, field: &'static str| match descriptor(v, field) {
        Ok(d) => refs.children.push(d),
        Err(e) => refs.unsupported.push(e.to_string()),
    };
    if let Some(v) = obj.get("config").filter(|v| !v.is_null()) {
        soft(v, "config");
    }
    for field in ["layers", "blobs"] {
        for v in obj
            .get(field)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            soft(v, if field == "layers" { "layers" } else { "blobs" });
        }
    }
    // Docker schema 1: {"fsLayers": [{"blobSum": "sha256:..."}]}.
    for v in obj
        .get("fsLayers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match v
            .get("blobSum")
            .and_then(Value::as_str)
            .map(|s| (s, Digest::parse(s)))
        {
            Some((_, Some(digest))) => refs.children.push(Descriptor {
                media_type: None,
                digest,
                size: None,
            }),
            Some((raw, None)) => refs.unsupported.push(format!("fsLayers: {raw:?}")),
            None => refs
                .unsupported
                .push("fsLayers: entry without blobSum".into()),
        }
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    #[test]
    fn image_manifest_references_config_layers_and_subject() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":3}}],
            "subject":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":4}}}}"#,
            d(1),
            d(2),
            d(3)
        );
        let r = references(body.as_bytes()).expect("parses");
        let got: Vec<_> = r.children.iter().map(|c| c.digest.to_string()).collect();
        assert_eq!(got, vec![d(3), d(1), d(2)]);
        assert_eq!(r.subject.map(|s| s.digest.to_string()), Some(d(3)));
    }

    #[test]
    fn index_artifact_and_schema1() {
        let idx = format!(
            r#"{{"manifests":[{{"digest":"{}"}},{{"digest":"{}"}}]}}"#,
            d(1),
            d(2)
        );
        assert_eq!(references(idx.as_bytes()).map(|r| r.children.len()), Ok(2));
        let art = format!(r#"{{"blobs":[{{"digest":"{}"}}]}}"#, d(5));
        assert_eq!(references(art.as_bytes()).map(|r| r.children.len()), Ok(1));
        let s1 = format!(
            r#"{{"schemaVersion":1,"fsLayers":[{{"blobSum":"{}"}}]}}"#,
            d(7)
        );
        let r = references(s1.as_bytes()).expect("parses");
        assert_eq!(r.children[0].digest.to_string(), d(7));
    }

    #[test]
    fn malformed_documents() {
        assert!(matches!(
            references(b"not json"),
            Err(ManifestError::NotJson(_))
        ));
        assert!(matches!(references(b"[1]"), Err(ManifestError::NotJson(_))));
        let bad_child = r#"{"manifests":[{"digest":"sha256:zz"}]}"#;
        assert!(matches!(
            references(bad_child.as_bytes()),
            Err(ManifestError::BadDescriptor {
                field: "manifests",
                ..
            })
        ));
        let bad_layer = r#"{"layers":[{"digest":"blake3:abc"}]}"#;
        let r = references(bad_layer.as_bytes()).expect("a bad layer digest is soft");
        assert!(r.children.is_empty());
        assert_eq!(r.unsupported.len(), 1);
    }

    #[test]
    fn kinds() {
        assert_eq!(
            content_kind(Some(
                "application/vnd.docker.distribution.manifest.list.v2+json"
            )),
            ContentKind::Manifest
        );
        assert_eq!(
            content_kind(Some("application/vnd.oci.image.layer.v1.tar+zstd")),
            ContentKind::Blob
        );
        let helm = Some("application/vnd.cncf.helm.config.v1+json");
        assert_eq!(content_kind(helm), ContentKind::Unknown);
        assert!(should_read(ContentKind::Unknown, helm, Some(100)));
        assert!(!should_read(
            ContentKind::Unknown,
            helm,
            Some(MAX_MANIFEST_SIZE + 1)
        ));
        assert!(!should_read(
            ContentKind::Unknown,
            Some("application/vnd.cncf.helm.chart.content.v1.tar+gzip"),
            Some(100)
        ));
    }
}
