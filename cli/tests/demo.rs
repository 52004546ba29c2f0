//! Runs the built `vmlink` binary's demo (host and guest processes) in its quick JSON form
//! and checks that it moved and verified real data, the file copy included.

use std::process::Command;

/// The unsigned integer that follows `"key":` in `json`, if any.
fn field(json: &str, key: &str) -> Option<u64> {
    let pattern = format!("\"{key}\":");
    let start = json.find(&pattern)? + pattern.len();
    let digits: String = json[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[test]
fn quick_json_demo_verifies_data() {
    let output = Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .args(["demo", "--quick", "--json"])
        .output()
        .expect("run vmlink");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "vmlink demo failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    let json = stdout.trim();
    assert!(
        json.starts_with('{') && json.ends_with('}'),
        "not a JSON object: {json}"
    );
    let packets = field(json, "verified_packets").expect("verified_packets in the JSON");
    let bytes = field(json, "verified_bytes").expect("verified_bytes in the JSON");
    let mismatches = field(json, "mismatches").expect("mismatches in the JSON");
    assert!(packets > 0, "no packets verified: {json}");
    assert!(bytes >= packets * 64, "too few bytes verified: {json}");
    assert_eq!(mismatches, 0, "mismatches reported: {json}");
    assert!(json.contains("\"first_mismatch\":null"), "{json}");
    assert!(json.contains("\"vmlink_verified\":true"), "{json}");
    assert!(json.contains("\"socket_verified\":true"), "{json}");
    assert_eq!(
        json.matches("\"why\":\"").count(),
        5,
        "each latency, streaming and file row says why: {json}"
    );
    assert!(json.contains("\"vmlink_runs_seconds\":["), "{json}");
    for mode in ["\"mode\":\"polling\"", "\"mode\":\"blocking\""] {
        assert!(json.contains(mode), "{mode} missing: {json}");
    }
    for size in [64, 65536] {
        assert!(
            json.contains(&format!("\"packet_bytes\":{size},")),
            "{size}-byte stream missing: {json}"
        );
    }
}

#[test]
fn help_describes_the_demo() {
    let output = Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .args(["demo", "--help"])
        .output()
        .expect("run vmlink");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.contains("--json") && help.contains("--quick"),
        "{help}"
    );
}

#[test]
fn the_secure_demo_compares_a_sealed_channel_with_a_plain_one() {
    for cipher in ["chacha", "aes"] {
        let output = Command::new(env!("CARGO_BIN_EXE_vmlink"))
            .args(["demo", "--quick", "--json", "--secure", "--cipher", cipher])
            .output()
            .expect("run vmlink");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "vmlink demo --secure --cipher {cipher} failed ({}):\nstdout: {stdout}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let json: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
        assert_eq!(json["mismatches"], 0, "{json}");
        let secure = &json["secure"];
        let name = if cipher == "aes" {
            "AES-256-GCM"
        } else {
            "ChaCha20-Poly1305"
        };
        assert_eq!(secure["cipher"], name, "{json}");
        assert_eq!(secure["guest_key_expected"], true, "{json}");
        assert!(
            secure["guest_key"]
                .as_str()
                .is_some_and(|k| k.starts_with("SHA256:")),
            "{json}"
        );
        for key in [
            "handshake_ns",
            "plain_p50_ns",
            "secure_p50_ns",
            "plain_stream_packets",
            "secure_stream_packets",
        ] {
            assert!(
                secure[key].as_u64().is_some_and(|n| n > 0),
                "{key} measured: {json}"
            );
        }
        assert_eq!(secure["stream_packet_bytes"], 65536, "{json}");
        // Every secure stream packet and round trip was checked with the rest.
        let checked = json["verified_packets"].as_u64().unwrap_or(0);
        assert!(
            checked > secure["secure_stream_packets"].as_u64().unwrap_or(u64::MAX),
            "{json}"
        );
    }
}

#[test]
fn a_cipher_without_secure_is_refused() {
    let output = Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .args(["demo", "--quick", "--cipher", "aes"])
        .output()
        .expect("run vmlink");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--secure"), "{stderr}");
}

#[test]
fn a_plain_demo_has_no_secure_section() {
    let output = Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .args(["demo", "--quick"])
        .output()
        .expect("run vmlink");
    assert!(output.status.success());
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(!table.contains("Secure channel"), "{table}");
    assert!(table.contains("0 mismatches"), "{table}");
}
