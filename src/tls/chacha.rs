//! TLS 1.3's ChaCha20-Poly1305 record protection with ring, holding 44 bytes of keys per
//! direction where ring's own suite holds about 540.
//!
//! A connection keeps its two traffic keys for its whole life. ring's key type is sized for
//! its largest algorithm, AES-GCM with its expanded schedule and GHASH table, whatever the
//! suite: 560 bytes per direction on the heap, a fifth of what an idle TLS subscriber costs
//! (`bench/run h1-tls`). This suite keeps ChaCha20-Poly1305's 32-byte key and sets up ring's
//! key for each record instead, which for ChaCha20 is a copy of those bytes. The record
//! protection is rustls's own for this suite (`rustls::crypto::ring::tls13`): nonce, additional
//! data and content type as RFC 8446 §5.2 has them.

use std::sync::LazyLock;

use ring::aead::{self, CHACHA20_POLY1305, LessSafeKey, UnboundKey};
use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter, MessageEncrypter,
    Nonce, OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload, Tls13AeadAlgorithm,
    UnsupportedOperationError, make_tls13_aad,
};
use rustls::{
    CipherSuite, CipherSuiteCommon, ConnectionTrafficSecrets, ContentType, Error, ProtocolVersion,
    SupportedCipherSuite, Tls13CipherSuite,
};

/// TLS_CHACHA20_POLY1305_SHA256 with ring's hash and HKDF, and the record protection below.
pub fn suite() -> SupportedCipherSuite {
    static SUITE: LazyLock<Tls13CipherSuite> = LazyLock::new(|| {
        let SupportedCipherSuite::Tls13(ring) =
            rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256
        else {
            unreachable!("a TLS 1.3 suite");
        };
        Tls13CipherSuite {
            common: CipherSuiteCommon {
                suite: CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
                hash_provider: ring.common.hash_provider,
                confidentiality_limit: ring.common.confidentiality_limit,
            },
            hkdf_provider: ring.hkdf_provider,
            aead_alg: &ChaCha20Poly1305,
            quic: None,
        }
    });
    SupportedCipherSuite::Tls13(&SUITE)
}

const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

struct ChaCha20Poly1305;

impl Tls13AeadAlgorithm for ChaCha20Poly1305 {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(RecordKey::new(&key, iv))
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(RecordKey::new(&key, iv))
    }

    fn key_len(&self) -> usize {
        KEY_LEN
    }

    fn extract_keys(
        &self,
        key: AeadKey,
        iv: Iv,
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        Ok(ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv })
    }

    fn fips(&self) -> bool {
        false
    }
}

/// One direction's key and IV.
struct RecordKey {
    key: [u8; KEY_LEN],
    iv: Iv,
}

impl RecordKey {
    fn new(key: &AeadKey, iv: Iv) -> Self {
        let key = key
            .as_ref()
            .try_into()
            .expect("rustls derives key_len() bytes");
        Self { key, iv }
    }

    fn ring_key(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &self.key).expect("a 32-byte key"))
    }

    fn nonce(&self, seq: u64) -> aead::Nonce {
        aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, seq).0)
    }
}

impl Drop for RecordKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

impl MessageEncrypter for RecordKey {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, Error> {
        let total_len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total_len);
        payload.extend_from_chunks(&msg.payload);
        payload.extend_from_slice(&msg.typ.to_array());
        let aad = aead::Aad::from(make_tls13_aad(total_len));
        self.ring_key()
            .seal_in_place_append_tag(self.nonce(seq), aad, &mut payload)
            .map_err(|_| Error::EncryptError)?;
        // TLS 1.3 records carry TLS 1.2's version (RFC 8446 §5.1).
        Ok(OutboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            payload,
        ))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + TAG_LEN
    }
}

impl MessageDecrypter for RecordKey {
    fn decrypt<'a>(
        &mut self,
        mut msg: InboundOpaqueMessage<'a>,
        seq: u64,
    ) -> Result<InboundPlainMessage<'a>, Error> {
        let payload = &mut msg.payload;
        if payload.len() < TAG_LEN {
            return Err(Error::DecryptError);
        }
        let aad = aead::Aad::from(make_tls13_aad(payload.len()));
        let plain_len = self
            .ring_key()
            .open_in_place(self.nonce(seq), aad, payload)
            .map_err(|_| Error::DecryptError)?
            .len();
        payload.truncate(plain_len);
        msg.into_tls13_unpadded_message()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Box<dyn MessageEncrypter>, Box<dyn MessageDecrypter>) {
        let key = || AeadKey::from([7; 32]);
        let iv = || Iv::new([9; 12]);
        (
            ChaCha20Poly1305.encrypter(key(), iv()),
            ChaCha20Poly1305.decrypter(key(), iv()),
        )
    }

    fn seal(encrypter: &mut dyn MessageEncrypter, data: &[u8], seq: u64) -> Vec<u8> {
        let chunks = [data];
        let plain = OutboundPlainMessage {
            typ: ContentType::ApplicationData,
            version: ProtocolVersion::TLSv1_3,
            payload: rustls::crypto::cipher::OutboundChunks::new(&chunks),
        };
        encrypter.encrypt(plain, seq).unwrap().encode()
    }

    fn open(
        decrypter: &mut dyn MessageDecrypter,
        record: &mut [u8],
        seq: u64,
    ) -> Result<Vec<u8>, Error> {
        let msg = InboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            &mut record[5..],
        );
        decrypter
            .decrypt(msg, seq)
            .map(|plain| plain.payload.to_vec())
    }

    /// The same bytes ring's own suite in rustls produces for the same key, IV and sequence.
    #[test]
    fn records_are_those_of_rustls_own_suite() {
        let SupportedCipherSuite::Tls13(ring) =
            rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256
        else {
            unreachable!();
        };
        let mut reference = ring
            .aead_alg
            .encrypter(AeadKey::from([7; 32]), Iv::new([9; 12]));
        let (mut encrypter, _) = pair();
        for seq in [0, 1, 41, u64::MAX - 1] {
            let data = format!("data: event {seq}\n\n");
            assert_eq!(
                seal(&mut *encrypter, data.as_bytes(), seq),
                seal(&mut *reference, data.as_bytes(), seq),
                "record {seq}"
            );
        }
    }

    #[test]
    fn a_record_opens_once_with_its_sequence_and_not_when_altered() {
        let (mut encrypter, mut decrypter) = pair();
        let record = seal(&mut *encrypter, b"hello", 5);
        assert_eq!(
            open(&mut *decrypter, &mut record.clone(), 5).unwrap(),
            b"hello"
        );
        assert!(open(&mut *decrypter, &mut record.clone(), 6).is_err());
        let mut altered = record.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(open(&mut *decrypter, &mut altered, 5).is_err());
    }
}
