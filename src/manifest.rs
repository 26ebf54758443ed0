//! Reading references out of OCI and Docker manifests and indexes.
//!
//! What a manifest references is decided by the registries and clients that pull it, and most
//! of them are written in Go (distribution, zot, containerd) and decode with `encoding/json`. So
//! documents are read the way Go reads them, and where readers could disagree ocigc takes the
//! union: field names match case-insensitively with Go's folding (`Layers`, `ſubject`), every
//! occurrence of a duplicate key counts (Go keeps the last, a map-based reader the first),
//! nesting is accepted up to Go's limit, and one malformed descriptor does not hide its
//! siblings. Only fields that carry references are decoded; everything else is skipped by
//! serde_json's iterative skipper without being built, so no input can exhaust the stack.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::digest::Digest;

/// Largest manifest ocigc reads; the distribution spec tells registries to accept 4 MiB.
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// Deepest nesting Go's `encoding/json` accepts (its scanner's `maxNestingDepth`); a deeper
/// document is not JSON to any Go registry.
pub const MAX_NESTING_DEPTH: usize = 10_000;

/// A media type, shared: a run holds one per descriptor it has read, and a registry uses a
/// handful of them.
pub type MediaType = std::sync::Arc<str>;

/// Distinct media types shared at most; beyond, each is held on its own (a bucket full of
/// made-up types costs memory, never correctness).
const MAX_INTERNED: usize = 1024;

/// The shared copy of `text`.
pub fn media_type(text: &str) -> MediaType {
    static SEEN: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<MediaType>>> =
        std::sync::LazyLock::new(Default::default);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = seen.get(text) {
        return t.clone();
    }
    let t: MediaType = text.into();
    if seen.len() < MAX_INTERNED {
        seen.insert(t.clone());
    }
    t
}

/// A reference to content: media type, digest and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Declared media type, if any.
    pub media_type: Option<MediaType>,
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
    /// Every `subject` the document declares (more than one only with duplicate keys).
    pub subjects: Vec<Descriptor>,
    /// Descriptors ocigc cannot follow (malformed, or a digest it cannot name): kept, reported.
    pub unsupported: Vec<String>,
    /// Non-canonical digests that name a canonical one once trimmed and lower-cased. The
    /// canonical digest is in `children` too, and a marker fails the repository closed: no Go
    /// reader names that blob, but a reader that normalizes digests would need it.
    pub ambiguous: Vec<String>,
    /// A key Go maps to `manifests` holds a list (or null, which Go reads as an empty one):
    /// the document is shaped like an image index.
    pub has_manifests: bool,
}

/// Why a document could not be read as a manifest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// Not JSON, or not a JSON object.
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// Nested deeper than Go accepts: no Go registry or client reads it.
    #[error("nested deeper than {MAX_NESTING_DEPTH} levels (Go's encoding/json limit)")]
    TooDeep,
}

/// A reference-carrying field, as Go would map an object key to it. The names are shared by
/// every level: a key only counts where its field exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Manifests,
    Subject,
    Config,
    Layers,
    Blobs,
    FsLayers,
    Digest,
    BlobSum,
    MediaType,
    Size,
    Other,
}

const FIELDS: &[(&str, Field)] = &[
    ("MANIFESTS", Field::Manifests),
    ("SUBJECT", Field::Subject),
    ("CONFIG", Field::Config),
    ("LAYERS", Field::Layers),
    ("BLOBS", Field::Blobs),
    ("FSLAYERS", Field::FsLayers),
    ("DIGEST", Field::Digest),
    ("BLOBSUM", Field::BlobSum),
    ("MEDIATYPE", Field::MediaType),
    ("SIZE", Field::Size),
];

/// Folds one character of a key the way Go's `encoding/json` matches struct fields: ASCII
/// upper case, plus the two non-ASCII runes whose simple case folding reaches an ASCII letter
/// (`ſ` and the Kelvin sign). Other runes stay as they are and never match, as in Go.
fn fold_char(c: char) -> char {
    match c {
        '\u{17F}' => 'S',
        '\u{212A}' => 'K',
        c => c.to_ascii_uppercase(),
    }
}

/// The field a raw key maps to. Invalid UTF-8 becomes U+FFFD first, as Go decodes it.
fn field_of(raw: &[u8]) -> Field {
    let key = String::from_utf8_lossy(raw);
    FIELDS
        .iter()
        .find(|(name, _)| {
            let mut folded = key.chars().map(fold_char);
            name.chars().all(|n| folded.next() == Some(n)) && folded.next().is_none()
        })
        .map_or(Field::Other, |&(_, f)| f)
}

/// Whether brackets outside strings nest deeper than `limit`. Runs before decoding because
/// serde_json's skipper, which is iterative, does not count depth at all.
fn nests_deeper_than(body: &[u8], limit: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Consumes the rest of a sequence or map without building it.
fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// An object key, as the field it maps to. Read as raw bytes: Go turns invalid UTF-8 into
/// U+FFFD instead of rejecting the document, and so does this.
struct Key(Field);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Key, E> {
                Ok(Key(field_of(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(field_of(v.as_bytes())))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A string value as Go decodes it (invalid UTF-8 becomes U+FFFD); `None` for an array.
/// Numbers, booleans and objects are a type error that fails the document, as in Go.
struct Text(Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Text, E> {
                Ok(Text(Some(String::from_utf8_lossy(v).into_owned())))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(Some(v.to_owned())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Text, A::Error> {
                drain_seq(seq).map(|()| Text(None))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A `size`: only a non-negative integer counts.
struct Size(Option<u64>);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Size, E> {
                Ok(Size(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Size, E> {
                Ok(Size(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Size, E> {
                Ok(Size(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Size, E> {
                Ok(Size(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Size, E> {
                Ok(Size(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Size, A::Error> {
                drain_seq(seq).map(|()| Size(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Size, A::Error> {
                drain_map(map).map(|()| Size(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Every value of the reference-carrying keys of one descriptor object (or of several
/// occurrences merged: Go decodes a duplicate key into the same struct, field by field).
#[derive(Default)]
struct Fields {
    digests: Vec<String>,
    blob_sums: Vec<String>,
    media_types: Vec<String>,
    sizes: Vec<u64>,
    /// Some occurrence was neither an object nor null.
    not_object: bool,
}

impl Fields {
    fn merge(&mut self, other: Fields) {
        self.digests.extend(other.digests);
        self.blob_sums.extend(other.blob_sums);
        self.media_types.extend(other.media_types);
        self.sizes.extend(other.sizes);
        self.not_object |= other.not_object;
    }
}

/// One element of a descriptor list, or the value of `config` / `subject`.
struct Entry(Fields);

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl V {
            fn other(self) -> Entry {
                Entry(Fields {
                    not_object: true,
                    ..Fields::default()
                })
            }
        }
        impl<'de> Visitor<'de> for V {
            type Value = Entry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a descriptor")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entry, A::Error> {
                let mut f = Fields::default();
                while let Some(Key(key)) = map.next_key()? {
                    let text = |t: Option<Text>| t.and_then(|t| t.0);
                    match key {
                        Field::Digest => f.digests.extend(text(map.next_value()?)),
                        Field::BlobSum => f.blob_sums.extend(text(map.next_value()?)),
                        Field::MediaType => f.media_types.extend(text(map.next_value()?)),
                        Field::Size => f.sizes.extend(map.next_value::<Size>()?.0),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Entry(f))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Entry, E> {
                Ok(Entry(Fields::default()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Entry, A::Error> {
                drain_seq(seq).map(|()| self.other())
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Entry, E> {
                Ok(self.other())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Entry, E> {
                Ok(self.other())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Entry, E> {
                Ok(self.other())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Entry, E> {
                Ok(self.other())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Entry, E> {
                Ok(self.other())
            }
        }
        d.deserialize_any(V)
    }
}

/// The value of a descriptor-list key: its elements, or `None` if it is not an array.
struct List(Option<Vec<Entry>>);

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = List;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of descriptors")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List, A::Error> {
                let mut items = Vec::new();
                while let Some(e) = seq.next_element()? {
                    items.push(e);
                }
                Ok(List(Some(items)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<List, E> {
                Ok(List(Some(Vec::new())))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<List, A::Error> {
                drain_map(map).map(|()| List(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<List, E> {
                Ok(List(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<List, E> {
                Ok(List(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<List, E> {
                Ok(List(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<List, E> {
                Ok(List(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<List, E> {
                Ok(List(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// The reference-carrying fields of a document, every occurrence of every key that Go would
/// map to them.
#[derive(Default)]
struct Doc {
    manifests: Vec<List>,
    subject: Vec<Entry>,
    config: Vec<Entry>,
    layers: Vec<List>,
    blobs: Vec<List>,
    fs_layers: Vec<List>,
}

impl<'de> Deserialize<'de> for Doc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Doc;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Doc, A::Error> {
                let mut doc = Doc::default();
                while let Some(Key(key)) = map.next_key()? {
                    match key {
                        Field::Manifests => doc.manifests.push(map.next_value()?),
                        Field::Subject => doc.subject.push(map.next_value()?),
                        Field::Config => doc.config.push(map.next_value()?),
                        Field::Layers => doc.layers.push(map.next_value()?),
                        Field::Blobs => doc.blobs.push(map.next_value()?),
                        Field::FsLayers => doc.fs_layers.push(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(doc)
            }
        }
        d.deserialize_map(V)
    }
}

/// Where a descriptor is: a field, and its index in a list.
#[derive(Clone, Copy)]
struct At(&'static str, Option<usize>);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.1 {
            Some(i) => write!(f, "{}[{i}]", self.0),
            None => f.write_str(self.0),
        }
    }
}

/// The canonical digest a non-canonical digest string would name for a reader that trims
/// and lower-cases it.
fn lenient_digest(raw: &str) -> Option<Digest> {
    Digest::parse(&raw.trim().to_ascii_lowercase())
}

/// Of the media types one descriptor declares, the one that asks the most of the marker: a
/// manifest type (read it, fail closed if unreadable) over an unknown one over a blob type.
fn most_demanding(types: &[String]) -> Option<MediaType> {
    types
        .iter()
        .max_by_key(|t| match content_kind(Some(t)) {
            ContentKind::Blob => 0,
            ContentKind::Unknown => 1,
            ContentKind::Manifest => 2,
        })
        .map(|t| media_type(t))
}

impl References {
    /// Follows every digest one (merged) descriptor declares and returns what it followed.
    fn follow(&mut self, at: At, fields: &Fields, blob_sum: bool) -> Vec<Descriptor> {
        let raws = if blob_sum {
            &fields.blob_sums
        } else {
            &fields.digests
        };
        if raws.is_empty() {
            let why = if fields.not_object {
                "not an object"
            } else if blob_sum {
                "no blobSum"
            } else {
                "no digest"
            };
            self.unsupported.push(format!("{at}: {why}"));
            return Vec::new();
        }
        let media_type = most_demanding(&fields.media_types);
        let size = fields.sizes.iter().min().copied();
        let mut followed: Vec<Descriptor> = Vec::new();
        for raw in raws {
            let digest = match Digest::parse(raw) {
                Some(d) => d,
                None => match lenient_digest(raw) {
                    Some(d) => {
                        self.ambiguous.push(format!("{at}: {raw:?} would name {d}"));
                        d
                    }
                    None => {
                        self.unsupported
                            .push(format!("{at}: unsupported digest {raw:?}"));
                        continue;
                    }
                },
            };
            if followed.iter().all(|f| f.digest != digest) {
                followed.push(Descriptor {
                    media_type: media_type.clone(),
                    digest,
                    size,
                });
            }
        }
        self.children.extend(followed.iter().cloned());
        followed
    }

    /// Follows a descriptor list, merging duplicate keys element by element as Go does.
    fn follow_lists(&mut self, field: &'static str, lists: Vec<List>, blob_sum: bool) {
        let mut slots: Vec<Fields> = Vec::new();
        for list in lists {
            let Some(items) = list.0 else {
                self.unsupported.push(format!("{field}: not an array"));
                continue;
            };
            for (i, Entry(fields)) in items.into_iter().enumerate() {
                match slots.get_mut(i) {
                    Some(slot) => slot.merge(fields),
                    None => slots.push(fields),
                }
            }
        }
        for (i, slot) in slots.iter().enumerate() {
            self.follow(At(field, Some(i)), slot, blob_sum);
        }
    }

    /// Follows `config` or `subject`: every occurrence merged into one descriptor, where a
    /// null (or absent) value means there is none.
    fn follow_single(&mut self, field: &'static str, entries: Vec<Entry>) -> Vec<Descriptor> {
        let mut merged = Fields::default();
        for Entry(fields) in entries {
            merged.merge(fields);
        }
        let present = !merged.digests.is_empty()
            || merged.not_object
            || !merged.media_types.is_empty()
            || !merged.sizes.is_empty();
        if present {
            self.follow(At(field, None), &merged, false)
        } else {
            Vec::new()
        }
    }
}

/// Extracts every reference from a manifest, index or unknown JSON document.
///
/// Reads what a Go registry or client would read, and more where readers could disagree (see
/// the module documentation). A malformed descriptor is recorded in
/// [`References::unsupported`] and its siblings are still followed: a blob ocigc cannot name
/// is also a blob it never deletes. The document fails only where Go's decoder fails too (not
/// JSON, too deep, a type error in a reference field).
pub fn references(body: &[u8]) -> Result<References, ManifestError> {
    if nests_deeper_than(body, MAX_NESTING_DEPTH) {
        return Err(ManifestError::TooDeep);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let doc = Doc::deserialize(&mut de)
        .and_then(|doc| de.end().map(|()| doc))
        .map_err(|e| ManifestError::NotJson(e.to_string()))?;

    let mut refs = References {
        has_manifests: doc.manifests.iter().any(|l| l.0.is_some()),
        ..References::default()
    };
    refs.follow_lists("manifests", doc.manifests, false);
    // An index's entries are manifests whatever type they declare (registries check that an
    // index's children exist as manifests): read them, and fail closed where that is
    // impossible, rather than skip a child that calls itself a blob or something unknown.
    for d in &mut refs.children {
        if content_kind(d.media_type.as_deref()) != ContentKind::Manifest {
            d.media_type = Some(media_type(UNTYPED_MANIFEST));
        }
    }
    refs.subjects = refs.follow_single("subject", doc.subject);
    refs.follow_single("config", doc.config);
    refs.follow_lists("layers", doc.layers, false);
    refs.follow_lists("blobs", doc.blobs, false);
    // Docker schema 1: {"fsLayers": [{"blobSum": "sha256:..."}]}.
    refs.follow_lists("fsLayers", doc.fs_layers, true);
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn digests(r: &References) -> Vec<String> {
        r.children.iter().map(|c| c.digest.to_string()).collect()
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
        assert_eq!(digests(&r), vec![d(3), d(1), d(2)]);
        let subjects: Vec<_> = r.subjects.iter().map(|s| s.digest.to_string()).collect();
        assert_eq!(subjects, vec![d(3)]);
        assert_eq!(r.children[1].size, Some(2));
        assert!(r.unsupported.is_empty() && r.ambiguous.is_empty());
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
        assert_eq!(digests(&r), vec![d(7)]);
    }

    #[test]
    fn field_names_match_case_insensitively_like_go() {
        // Go folds 'ſ' (U+017F) to 's' and the Kelvin sign (U+212A) to 'k'.
        let body = format!(
            r#"{{"Manifests":[{{"DIGEST":"{}","MediaType":"application/vnd.oci.image.manifest.v1+json"}}],
            "Config":{{"Digest":"{}"}},"LAYERS":[{{"dIgEsT":"{}"}}],"Blobs":[{{"digeſt":"{}"}}],
            "Subject":{{"digest":"{}"}},"FSLayers":[{{"BlobSum":"{}"}}],
            "layer\u017F":[{{"digest":"{}"}}],"bLOBS":[{{"digest":"{}"}}]}}"#,
            d(1),
            d(2),
            d(3),
            d(4),
            d(5),
            d(6),
            d(7),
            d(8)
        );
        let r = references(body.as_bytes()).expect("parses");
        let mut got = digests(&r);
        got.sort();
        assert_eq!(got, (1..=8).map(d).collect::<Vec<_>>());
        assert_eq!(
            r.children[0].media_type.as_deref(),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
        assert_eq!(r.subjects.len(), 1);
        // No reference field has a 'k', but the folding is Go's all the same.
        assert_eq!(fold_char('\u{212A}'), 'K');
        assert_eq!(field_of("ſubject".as_bytes()), Field::Subject);
        assert_eq!(field_of("SubjecT".as_bytes()), Field::Subject);
        assert_eq!(field_of("subjects".as_bytes()), Field::Other);
        assert_eq!(field_of("subjec".as_bytes()), Field::Other);
        // Folding that Go does not do: a dotless i is not an i, an underscore is not dropped.
        let not_go = format!(
            r#"{{"layer_s":[{{"digest":"{}"}}],"conf\u0131g":{{"digest":"{}"}}}}"#,
            d(1),
            d(2)
        );
        assert_eq!(
            references(not_go.as_bytes()).map(|r| r.children.len()),
            Ok(0)
        );
    }

    #[test]
    fn escaped_keys_and_invalid_utf8_are_read_like_go() {
        // "\u004cayers" is "Layers"; invalid UTF-8 elsewhere does not hide the document.
        let mut body = format!(
            r#"{{"\u004cayers":[{{"digest":"{}"}}],"annotations":{{"a":""#,
            d(1)
        )
        .into_bytes();
        body.extend_from_slice(b"\xff\xfe\"}, \"x\": \"\\ud800\"}");
        let r = references(&body).expect("Go accepts invalid UTF-8 and lone surrogates");
        assert_eq!(digests(&r), vec![d(1)]);
    }

    #[test]
    fn duplicate_keys_are_a_union() {
        // Go keeps the last "layers", a map-based reader the first: both are followed. Go
        // also merges a duplicate descriptor into the same element, field by field.
        let body = format!(
            r#"{{"layers":[{{"digest":"{}"}}],"layers":[{{"digest":"{}"}}],
            "config":{{"digest":"{}","digest":"{}"}},
            "manifests":[{{"digest":"{}"}}],
            "Manifests":[{{"mediaType":"application/vnd.oci.image.index.v1+json"}}],
            "subject":{{"digest":"{}"}},"subject":{{"digest":"{}"}}}}"#,
            d(1),
            d(2),
            d(3),
            d(4),
            d(5),
            d(6),
            d(7)
        );
        let r = references(body.as_bytes()).expect("parses");
        let mut got = digests(&r);
        got.sort();
        assert_eq!(got, (1..=7).map(d).collect::<Vec<_>>());
        let m = r
            .children
            .iter()
            .find(|c| c.digest.to_string() == d(5))
            .expect("manifest entry");
        assert_eq!(
            content_kind(m.media_type.as_deref()),
            ContentKind::Manifest,
            "the media type of the merged element counts"
        );
        assert_eq!(r.subjects.len(), 2);
        assert!(r.unsupported.is_empty(), "{:?}", r.unsupported);
    }

    #[test]
    fn media_types_are_shared() {
        let a = media_type("application/vnd.oci.image.layer.v1.tar+gzip");
        let b = media_type("application/vnd.oci.image.layer.v1.tar+gzip");
        assert!(std::sync::Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "application/vnd.oci.image.layer.v1.tar+gzip");
    }

    #[test]
    fn conflicting_media_types_ask_for_a_read() {
        let body = format!(
            r#"{{"layers":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}"}}]}}"#,
            d(1)
        );
        let r = references(body.as_bytes()).expect("parses");
        assert_eq!(
            content_kind(r.children[0].media_type.as_deref()),
            ContentKind::Manifest
        );
    }

    #[test]
    fn nesting_up_to_go_limit_is_read() {
        let deep = |n: usize| {
            format!(
                r#"{{"annotations":{}{},"layers":[{{"digest":"{}"}}]}}"#,
                "[".repeat(n),
                "]".repeat(n),
                d(1)
            )
        };
        // The top-level object is one level, as in Go's scanner.
        let ok = deep(MAX_NESTING_DEPTH - 1);
        assert_eq!(
            references(ok.as_bytes()).map(|r| digests(&r)),
            Ok(vec![d(1)])
        );
        let too_deep = deep(MAX_NESTING_DEPTH);
        assert_eq!(references(too_deep.as_bytes()), Err(ManifestError::TooDeep));
        // Brackets inside strings are text, not nesting.
        let in_string = format!(
            r#"{{"a":"{}\"[","layers":[{{"digest":"{}"}}]}}"#,
            "[".repeat(MAX_NESTING_DEPTH + 5),
            d(2)
        );
        assert_eq!(
            references(in_string.as_bytes()).map(|r| digests(&r)),
            Ok(vec![d(2)])
        );
    }

    #[test]
    fn deep_values_in_reference_fields_do_not_recurse() {
        // Deep values where descriptors are expected: skipped iteratively, never built.
        let n = MAX_NESTING_DEPTH - 10;
        let body = format!(
            r#"{{"layers":[{}{},{{"digest":"{}","size":{}{}}},{{"digest":{}{}}}],"config":{}{}}}"#,
            "[".repeat(n),
            "]".repeat(n),
            d(1),
            "{\"a\":".repeat(n - 5) + "1",
            "}".repeat(n - 5),
            "[".repeat(n),
            "]".repeat(n),
            "[".repeat(n),
            "]".repeat(n),
        );
        let r = references(body.as_bytes()).expect("parses");
        assert_eq!(digests(&r), vec![d(1)]);
        let expected = [
            "config: not an object",
            "layers[0]: not an object",
            "layers[2]: no digest",
        ];
        assert_eq!(r.unsupported, expected);
    }

    #[test]
    fn four_mib_of_brackets_neither_panics_nor_overflows() {
        // A small stack, as a worker thread might have, shows any recursion on the input.
        let run = |body: Vec<u8>| {
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || references(&body))
                .expect("spawn")
                .join()
                .expect("no panic, no overflow")
        };
        let size = MAX_MANIFEST_SIZE as usize;
        assert_eq!(run(vec![b'['; size]), Err(ManifestError::TooDeep));
        let mut objects = b"{\"a\":".repeat(size / 5);
        objects.truncate(size);
        assert_eq!(run(objects), Err(ManifestError::TooDeep));
        // Within Go's limit but far beyond serde_json's own 128, in a descriptor's place.
        let mut body = b"{\"layers\":".to_vec();
        body.extend(std::iter::repeat_n(b'[', MAX_NESTING_DEPTH - 1));
        body.extend(std::iter::repeat_n(b']', MAX_NESTING_DEPTH - 1));
        body.push(b'}');
        let r = run(body).expect("valid for Go");
        assert!(r.children.is_empty());
        // Unterminated: an error, not a panic.
        let mut open = b"{\"layers\":".to_vec();
        open.extend(std::iter::repeat_n(b'[', 5000));
        assert!(matches!(run(open), Err(ManifestError::NotJson(_))));
    }

    #[test]
    fn one_bad_descriptor_does_not_hide_its_siblings() {
        let body = format!(
            r#"{{"manifests":[{{"digest":"sha256:zz"}},{{"digest":"{}"}},7,null,{{"size":1}}],
            "subject":{{"digest":"blake3:abc"}},
            "config":"{}",
            "layers":[{{"digest":"{}"}},["x"],{{"digest":"md5:00"}}],
            "blobs":{{"digest":"{}"}},
            "fsLayers":[{{"digest":"{}"}},{{"blobSum":"{}"}}]}}"#,
            d(1),
            d(2),
            d(3),
            d(4),
            d(5),
            d(6)
        );
        let r = references(body.as_bytes()).expect("a bad descriptor is one bad descriptor");
        assert_eq!(digests(&r), vec![d(1), d(3), d(6)]);
        assert!(r.subjects.is_empty());
        assert!(r.ambiguous.is_empty());
        let expected = [
            "manifests[0]: unsupported digest \"sha256:zz\"",
            "manifests[2]: not an object",
            "manifests[3]: no digest",
            "manifests[4]: no digest",
            "subject: unsupported digest \"blake3:abc\"",
            "config: not an object",
            "layers[1]: not an object",
            "layers[2]: unsupported digest \"md5:00\"",
            "blobs: not an array",
            "fsLayers[0]: no blobSum",
        ];
        assert_eq!(r.unsupported, expected);
    }

    #[test]
    fn a_digest_that_could_name_a_blob_is_kept_and_flagged() {
        let upper = d(0xab).to_uppercase();
        let body = format!(
            r#"{{"layers":[{{"digest":"{upper}"}},{{"digest":" {} "}}]}}"#,
            d(0xcd)
        );
        let r = references(body.as_bytes()).expect("parses");
        assert_eq!(digests(&r), vec![d(0xab), d(0xcd)]);
        assert_eq!(r.ambiguous.len(), 2);
    }

    #[test]
    fn malformed_documents() {
        assert!(matches!(
            references(b"not json"),
            Err(ManifestError::NotJson(_))
        ));
        assert!(matches!(references(b"[1]"), Err(ManifestError::NotJson(_))));
        assert!(matches!(
            references(b"{} x"),
            Err(ManifestError::NotJson(_))
        ));
        // Go's decoder fails on a type error in a reference field; so does this.
        assert!(matches!(
            references(br#"{"layers":[{"digest":5}]}"#),
            Err(ManifestError::NotJson(_))
        ));
        // A null digest is no digest, as in Go.
        let r = references(br#"{"layers":[{"digest":null}]}"#).expect("parses");
        assert_eq!(r.unsupported, ["layers[0]: no digest"]);
        // A null config or subject is none at all.
        let r = references(br#"{"config":null,"subject":null}"#).expect("parses");
        assert_eq!(r, References::default());
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
