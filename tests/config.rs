//! Configuration layering, the replaced image's variables, the errors an operator sees, the
//! command line (`serve`, `check-config`), and the example file in `etc/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Jail, Profile, Provider};
use flagsmith_sse::Config;
use flagsmith_sse::config::{
    BackendKind, ConfigError, Http2Config, ListenAddr, LogConfig, LogFormat, LogLevel, NatsConfig,
    NatsStorage, RedisConfig, Seconds, Secret, ShutdownConfig,
};

const TOKEN: &str = "test-token";
const TOKEN_ENV: (&str, &str) = ("FLAGSMITH_SSE_AUTHENTICATION_TOKEN", TOKEN);
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/etc/flagsmith-sse.toml");
const EXAMPLE_TOKEN_FILE: &str = "/etc/flagsmith-sse/authentication_token";

/// Runs `f` in a fresh directory with the environment holding exactly `env`: a variable
/// inherited from the test runner (a stray `NATS_URL`, say) must not change the outcome.
#[allow(clippy::result_large_err)] // `Jail` requires its closure to return `figment::Result`.
fn jailed<T>(env: &[(&str, &str)], f: impl FnOnce(&Path) -> T) -> T {
    let mut result = None;
    Jail::expect_with(|jail| {
        jail.clear_env();
        for (name, value) in env {
            jail.set_env(name, value);
        }
        result = Some(f(jail.directory()));
        Ok(())
    });
    result.expect("the jail ran")
}

/// Loads `files` (name, contents), in order, with the environment holding exactly `env`.
fn load(files: &[(&str, &str)], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    jailed(env, |dir| {
        let paths: Vec<PathBuf> = files
            .iter()
            .map(|(name, contents)| {
                let path = dir.join(name);
                std::fs::write(&path, contents).unwrap();
                path
            })
            .collect();
        Config::load(&paths)
    })
}

#[track_caller]
fn error(files: &[(&str, &str)], env: &[(&str, &str)]) -> String {
    load(files, env)
        .expect_err("the configuration should be rejected")
        .to_string()
}

#[track_caller]
fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "expected {part:?} in the message:\n{message}"
        );
    }
}

fn addr(text: &str) -> ListenAddr {
    ListenAddr(text.parse().unwrap())
}

fn secs(seconds: f64) -> Seconds {
    Seconds::new(seconds).unwrap()
}

fn with_token() -> Config {
    Config {
        authentication_token: Some(Secret::new(TOKEN.to_owned())),
        ..Config::default()
    }
}

fn token(config: &Config) -> &str {
    config
        .authentication_token
        .as_ref()
        .expect("a token")
        .expose()
}

// Defaults

#[test]
fn defaults_are_the_documented_values() {
    let config = load(&[("empty.toml", "")], &[TOKEN_ENV]).unwrap();
    // Spelled out rather than compared with `Config::default()`, so that changing a default
    // is a deliberate act that also updates this test, the docs and the example file.
    let documented = Config {
        listen: addr("0.0.0.0:8088"),
        tls: None,
        publish_listen: None,
        publish_tls: None,
        authentication_token: Some(Secret::new(TOKEN.to_owned())),
        authentication_token_file: None,
        backend: BackendKind::Memory,
        max_stream_age: secs(30.0),
        max_stream_age_jitter: 0.1,
        keepalive_interval: secs(15.0),
        write_timeout: secs(30.0),
        retention: secs(3600.0),
        max_streams: 200_000,
        publish_timeout: secs(1.5),
        http2: Http2Config {
            max_concurrent_streams: 1000,
            keepalive_interval: secs(20.0),
            keepalive_timeout: secs(20.0),
        },
        nats: NatsConfig {
            url: "nats://127.0.0.1:4222".to_owned(),
            stream: "environments-stream".to_owned(),
            storage: NatsStorage::File,
            replicas: 1,
            credentials_file: None,
        },
        redis: RedisConfig {
            host: "localhost".to_owned(),
            port: 6379,
            username: None,
            password: None,
            password_file: None,
            tls: false,
            tls_ca_file: None,
            cluster: false,
            scan_count: 500,
            resync_interval: secs(30.0),
            namespace: "flagsmith-sse".to_owned(),
        },
        shutdown: ShutdownConfig {
            drain_period: secs(10.0),
            timeout: secs(20.0),
        },
        log: LogConfig {
            format: LogFormat::Auto,
            level: LogLevel::Info,
        },
    };
    assert_eq!(config, documented);
}

// Layering

#[test]
fn toml_overrides_defaults() {
    let toml = r#"
        listen = "127.0.0.1:1000"
        max_stream_age = 60
        [nats]
        stream = "from-toml"
        [log]
        level = "debug"
    "#;
    let config = load(&[("site.toml", toml)], &[TOKEN_ENV]).unwrap();
    let mut expected = with_token();
    expected.listen = addr("127.0.0.1:1000");
    expected.max_stream_age = secs(60.0);
    expected.nats.stream = "from-toml".to_owned();
    expected.log.level = LogLevel::Debug;
    assert_eq!(config, expected);
}

#[test]
fn flagsmith_sse_environment_overrides_toml() {
    let toml = r#"
        listen = "127.0.0.1:1000"
        max_streams = 10
    "#;
    let config = load(
        &[("site.toml", toml)],
        &[TOKEN_ENV, ("FLAGSMITH_SSE_LISTEN", "127.0.0.1:2000")],
    )
    .unwrap();
    assert_eq!(config.listen, addr("127.0.0.1:2000"));
    // Only the keys the environment sets are overridden.
    assert_eq!(config.max_streams, 10);
}

#[test]
fn nested_keys_from_the_environment_use_double_underscores() {
    let toml = r#"
        [nats]
        url = "nats://from-toml:4222"
        stream = "from-toml"
    "#;
    let config = load(
        &[("site.toml", toml)],
        &[
            TOKEN_ENV,
            ("FLAGSMITH_SSE_BACKEND", "nats"),
            ("FLAGSMITH_SSE_NATS__URL", "nats://from-env:4222"),
            ("FLAGSMITH_SSE_SHUTDOWN__DRAIN_PERIOD", "5"),
        ],
    )
    .unwrap();
    let mut expected = with_token();
    expected.backend = BackendKind::Nats;
    expected.nats.url = "nats://from-env:4222".to_owned();
    expected.nats.stream = "from-toml".to_owned();
    expected.shutdown.drain_period = secs(5.0);
    assert_eq!(config, expected);
}

#[test]
fn legacy_variables_override_toml_and_flagsmith_sse_environment() {
    let toml = r#"
        listen = "127.0.0.1:1000"
        authentication_token = "from-toml"
        backend = "memory"
        max_stream_age = 60
        [nats]
        url = "nats://from-toml:4222"
    "#;
    let config = load(
        &[("site.toml", toml)],
        &[
            ("FLAGSMITH_SSE_LISTEN", "127.0.0.1:2000"),
            ("FLAGSMITH_SSE_AUTHENTICATION_TOKEN", "from-env"),
            ("FLAGSMITH_SSE_MAX_STREAM_AGE", "90"),
            ("FLAGSMITH_SSE_NATS__URL", "nats://from-env:4222"),
            ("LISTEN_ADDR", "127.0.0.1:3000"),
            ("SSE_AUTHENTICATION_TOKEN", "from-legacy"),
            ("MAX_STREAM_AGE", "120"),
            ("NATS_URL", "nats://from-legacy:4222"),
        ],
    )
    .unwrap();
    let mut expected = Config {
        authentication_token: Some(Secret::new("from-legacy".to_owned())),
        ..Config::default()
    };
    expected.listen = addr("127.0.0.1:3000");
    expected.max_stream_age = secs(120.0);
    expected.backend = BackendKind::Nats;
    expected.nats.url = "nats://from-legacy:4222".to_owned();
    assert_eq!(config, expected);
}

#[test]
fn config_files_layer_in_the_order_given() {
    let first = (
        "first.toml",
        r#"
            listen = "127.0.0.1:1000"
            max_streams = 10
            [log]
            level = "debug"
        "#,
    );
    let second = (
        "second.toml",
        r#"
            listen = "127.0.0.1:2000"
            [log]
            format = "json"
        "#,
    );
    let config = load(&[first, second], &[TOKEN_ENV]).unwrap();
    let mut expected = with_token();
    expected.listen = addr("127.0.0.1:2000");
    expected.max_streams = 10;
    expected.log.level = LogLevel::Debug;
    expected.log.format = LogFormat::Json;
    assert_eq!(config, expected);

    let reversed = load(&[second, first], &[TOKEN_ENV]).unwrap();
    assert_eq!(reversed.listen, addr("127.0.0.1:1000"));
}

// The replaced image's variables

#[test]
fn nats_url_alone_selects_the_nats_backend() {
    let config = load(
        &[("empty.toml", "")],
        &[TOKEN_ENV, ("NATS_URL", "nats://nats.internal:4222")],
    )
    .unwrap();
    let mut expected = with_token();
    expected.backend = BackendKind::Nats;
    expected.nats.url = "nats://nats.internal:4222".to_owned();
    assert_eq!(config, expected);
}

#[test]
fn listen_addr_accepts_the_port_only_form() {
    let config = load(
        &[("site.toml", r#"listen = "127.0.0.1:1000""#)],
        &[TOKEN_ENV, ("LISTEN_ADDR", ":8088")],
    )
    .unwrap();
    assert_eq!(config.listen, addr("0.0.0.0:8088"));
}

#[test]
fn listen_addr_accepts_ipv6() {
    let config = load(
        &[("empty.toml", "")],
        &[TOKEN_ENV, ("LISTEN_ADDR", "[::1]:9000")],
    )
    .unwrap();
    assert_eq!(config.listen, addr("[::1]:9000"));
}

#[test]
fn negative_max_stream_age_means_endless() {
    let config = load(
        &[("empty.toml", "")],
        &[TOKEN_ENV, ("MAX_STREAM_AGE", "-1")],
    )
    .unwrap();
    assert_eq!(config.max_stream_age, secs(0.0));
}

#[test]
fn max_stream_age_sets_seconds() {
    let config = load(
        &[("empty.toml", "")],
        &[TOKEN_ENV, ("MAX_STREAM_AGE", "45")],
    )
    .unwrap();
    assert_eq!(config.max_stream_age, secs(45.0));
}

#[test]
fn stream_delay_is_accepted_and_changes_nothing() {
    let config = load(&[("empty.toml", "")], &[TOKEN_ENV, ("STREAM_DELAY", "5")]).unwrap();
    assert_eq!(config, with_token());
}

#[test]
fn sse_authentication_token_sets_the_token() {
    let config = load(
        &[("empty.toml", "")],
        &[("SSE_AUTHENTICATION_TOKEN", "legacy-token")],
    )
    .unwrap();
    assert_eq!(token(&config), "legacy-token");
    assert_eq!(config.authentication_token_file, None);
}

#[test]
fn tokens_from_the_environment_are_taken_verbatim() {
    // figment would read these as a number (dropping the zero), a bool and a float.
    for raw in ["12345", "0123", "true", "1.50"] {
        let config = load(
            &[("empty.toml", "")],
            &[("FLAGSMITH_SSE_AUTHENTICATION_TOKEN", raw)],
        )
        .unwrap();
        assert_eq!(token(&config), raw);
    }
}

// Errors name the key and where it came from

#[test]
fn unknown_key_names_key_and_file() {
    let message = error(&[("site.toml", "bogus = 1")], &[TOKEN_ENV]);
    assert_mentions(&message, &["unknown field", "`bogus`", "site.toml"]);
}

#[test]
fn unknown_nested_key_names_its_section() {
    let message = error(&[("site.toml", "[nats]\nbogus = 1")], &[TOKEN_ENV]);
    assert_mentions(&message, &["unknown field", "nats.bogus", "site.toml"]);
}

#[test]
fn unknown_environment_key_names_the_prefix() {
    let message = error(
        &[("empty.toml", "")],
        &[TOKEN_ENV, ("FLAGSMITH_SSE_BOGUS", "1")],
    );
    assert_mentions(&message, &["unknown field", "BOGUS", "`FLAGSMITH_SSE_`"]);
}

#[test]
fn error_names_the_file_among_several() {
    let message = error(
        &[
            ("base.toml", "max_streams = 10"),
            ("site.toml", "bogus = 1"),
        ],
        &[TOKEN_ENV],
    );
    assert_mentions(&message, &["`bogus`", "site.toml"]);
    assert!(!message.contains("base.toml"), "{message}");
}

#[test]
fn wrong_type_in_toml_names_key_and_file() {
    let message = error(&[("site.toml", r#"max_stream_age = "abc""#)], &[TOKEN_ENV]);
    assert_mentions(&message, &["max_stream_age", r#""abc""#, "site.toml"]);
}

#[test]
fn wrong_type_in_max_stream_age_names_the_variable() {
    let message = error(
        &[("empty.toml", "")],
        &[TOKEN_ENV, ("MAX_STREAM_AGE", "abc")],
    );
    assert_mentions(
        &message,
        &[
            "max_stream_age",
            r#""abc""#,
            "environment variable `MAX_STREAM_AGE`",
        ],
    );
}

#[test]
fn bad_listen_address_names_key_and_source() {
    // A host name is the likely mistake: only IP addresses are accepted.
    let message = error(
        &[("site.toml", r#"listen = "localhost:8088""#)],
        &[TOKEN_ENV],
    );
    assert_mentions(&message, &["listen", "localhost:8088", "site.toml"]);

    let message = error(
        &[("empty.toml", "")],
        &[TOKEN_ENV, ("LISTEN_ADDR", "localhost:8088")],
    );
    assert_mentions(
        &message,
        &[
            "listen",
            "localhost:8088",
            "environment variable `LISTEN_ADDR`",
        ],
    );
}

#[test]
fn negative_seconds_in_toml_are_rejected() {
    let message = error(&[("site.toml", "keepalive_interval = -5")], &[TOKEN_ENV]);
    assert_mentions(
        &message,
        &["keepalive_interval", "non-negative", "site.toml"],
    );
}

#[test]
fn jitter_must_be_a_fraction() {
    let message = error(
        &[("site.toml", "max_stream_age_jitter = 1.5")],
        &[TOKEN_ENV],
    );
    assert_mentions(
        &message,
        &["`max_stream_age_jitter`", "TOML file", "fraction"],
    );
}

#[test]
fn publish_timeout_must_stay_below_flagsmiths_timeout() {
    let message = error(&[("site.toml", "publish_timeout = 3")], &[TOKEN_ENV]);
    assert_mentions(&message, &["`publish_timeout`", "TOML file", "less than 2"]);

    let message = error(
        &[("empty.toml", "")],
        &[TOKEN_ENV, ("FLAGSMITH_SSE_PUBLISH_TIMEOUT", "3")],
    );
    assert_mentions(
        &message,
        &["`publish_timeout`", "`FLAGSMITH_SSE_PUBLISH_TIMEOUT`"],
    );
}

#[test]
fn shutdown_timeout_must_cover_the_drain_period() {
    let toml = "[shutdown]\ndrain_period = 30\ntimeout = 25";
    let message = error(&[("site.toml", toml)], &[TOKEN_ENV]);
    assert_mentions(
        &message,
        &["`shutdown.timeout`", "shutdown.drain_period", "TOML file"],
    );
}

#[test]
fn tls_and_the_publish_listener_come_from_toml_and_the_environment() {
    let toml = r#"
        publish_listen = "127.0.0.1:8089"
        [tls]
        certificate_file = "/etc/tls/fullchain.pem"
        key_file = "/etc/tls/key.pem"
        [http2]
        max_concurrent_streams = 50
    "#;
    let config = load(
        &[("site.toml", toml)],
        &[
            TOKEN_ENV,
            (
                "FLAGSMITH_SSE_PUBLISH_TLS__CERTIFICATE_FILE",
                "/internal.crt",
            ),
            ("FLAGSMITH_SSE_PUBLISH_TLS__KEY_FILE", "/internal.key"),
            ("FLAGSMITH_SSE_HTTP2__KEEPALIVE_INTERVAL", "5"),
        ],
    )
    .unwrap();
    let tls = config.tls.expect("tls from the file");
    assert_eq!(tls.certificate_file, Path::new("/etc/tls/fullchain.pem"));
    assert_eq!(tls.key_file, Path::new("/etc/tls/key.pem"));
    assert_eq!(config.publish_listen, Some(addr("127.0.0.1:8089")));
    let publish_tls = config
        .publish_tls
        .expect("publish_tls from the environment");
    assert_eq!(publish_tls.certificate_file, Path::new("/internal.crt"));
    assert_eq!(publish_tls.key_file, Path::new("/internal.key"));
    assert_eq!(config.http2.max_concurrent_streams, 50);
    assert_eq!(config.http2.keepalive_interval, secs(5.0));
    assert_eq!(config.http2.keepalive_timeout, secs(20.0));
}

#[test]
fn tls_needs_both_files() {
    let toml = "[tls]\ncertificate_file = \"/etc/tls/fullchain.pem\"";
    let message = error(&[("site.toml", toml)], &[TOKEN_ENV]);
    assert_mentions(&message, &["key_file", "tls", "site.toml"]);
}

#[test]
fn publish_listen_must_differ_from_listen() {
    let toml = "listen = \"127.0.0.1:8088\"";
    let message = error(
        &[("site.toml", toml)],
        &[
            TOKEN_ENV,
            ("FLAGSMITH_SSE_PUBLISH_LISTEN", "127.0.0.1:8088"),
        ],
    );
    assert_mentions(
        &message,
        &[
            "`publish_listen`",
            "`FLAGSMITH_SSE_PUBLISH_LISTEN`",
            "also `listen`",
            "site.toml",
        ],
    );
}

#[test]
fn publish_tls_needs_a_publish_listener() {
    let toml = "[publish_tls]\ncertificate_file = \"/a.crt\"\nkey_file = \"/a.key\"";
    let message = error(&[("site.toml", toml)], &[TOKEN_ENV]);
    assert_mentions(&message, &["`publish_tls`", "site.toml", "publish_listen"]);
}

#[test]
fn settings_that_must_be_positive() {
    for (key, toml) in [
        ("write_timeout", "write_timeout = 0"),
        (
            "http2.max_concurrent_streams",
            "[http2]\nmax_concurrent_streams = 0",
        ),
        (
            "http2.keepalive_interval",
            "[http2]\nkeepalive_interval = 0",
        ),
        ("http2.keepalive_timeout", "[http2]\nkeepalive_timeout = 0"),
    ] {
        let message = error(&[("site.toml", toml)], &[TOKEN_ENV]);
        assert_mentions(&message, &[&format!("`{key}`"), "site.toml"]);
    }
}

#[test]
fn missing_token_says_how_to_set_one() {
    let message = error(&[("empty.toml", "")], &[]);
    assert_mentions(
        &message,
        &[
            "authentication token is required",
            "authentication_token_file",
            "FLAGSMITH_SSE_AUTHENTICATION_TOKEN_FILE",
            "SSE_AUTHENTICATION_TOKEN",
        ],
    );
}

#[test]
fn token_and_token_file_together_are_rejected() {
    let toml = r#"
        authentication_token = "inline"
        authentication_token_file = "/run/token"
    "#;
    let message = error(&[("site.toml", toml)], &[]);
    assert_mentions(
        &message,
        &[
            "authentication_token ",
            "authentication_token_file",
            "not both",
        ],
    );
}

#[test]
fn redis_host_alone_selects_redis_on_the_redis_images_port() {
    let config = load(
        &[("empty.toml", "")],
        &[TOKEN_ENV, ("REDIS_HOST", "redis.internal")],
    )
    .unwrap();
    let mut expected = with_token();
    expected.backend = BackendKind::Redis;
    expected.redis.host = "redis.internal".to_owned();
    expected.listen = addr("0.0.0.0:8000");
    assert_eq!(config, expected);
}

#[test]
fn a_configured_listen_address_wins_over_the_redis_images_port() {
    let env = [TOKEN_ENV, ("REDIS_HOST", "redis.internal")];
    let toml = load(&[("a.toml", "listen = \"127.0.0.1:9000\"")], &env).unwrap();
    assert_eq!(toml.listen, addr("127.0.0.1:9000"));
    let legacy = load(&[], &[env[0], env[1], ("LISTEN_ADDR", ":8088")]).unwrap();
    assert_eq!(legacy.listen, addr("0.0.0.0:8088"));
    let own = load(
        &[],
        &[env[0], env[1], ("FLAGSMITH_SSE_LISTEN", "127.0.0.1:7000")],
    )
    .unwrap();
    assert_eq!(own.listen, addr("127.0.0.1:7000"));
    // Without REDIS_HOST, a TOML `backend = "redis"` keeps this service's own default port.
    let toml_redis = load(&[("a.toml", "backend = \"redis\"")], &[TOKEN_ENV]).unwrap();
    assert_eq!(toml_redis.listen, addr("0.0.0.0:8088"));
}

#[test]
fn every_variable_of_the_redis_image_is_read() {
    let config = load(
        &[("a.toml", "[redis]\nport = 1\ncluster = false\n")],
        &[
            TOKEN_ENV,
            ("REDIS_HOST", "redis.internal"),
            ("REDIS_PORT", "6380"),
            ("REDIS_USERNAME", "sse"),
            ("REDIS_PASSWORD", "0123"),
            ("REDIS_USE_SSL", "True"),
            ("USE_CLUSTER_MODE", "true"),
            ("REDIS_SCAN_COUNT", "100"),
            ("CACHE_UPDATE_INTERVAL_SECONDS", "0.5"),
            ("STREAM_DELAY", "1"),
        ],
    )
    .unwrap();
    let mut expected = with_token();
    expected.backend = BackendKind::Redis;
    expected.listen = addr("0.0.0.0:8000");
    expected.redis = RedisConfig {
        host: "redis.internal".to_owned(),
        port: 6380,
        username: Some("sse".to_owned()),
        password: Some(Secret::new("0123".to_owned())),
        tls: true,
        cluster: true,
        scan_count: 100,
        resync_interval: secs(0.5),
        ..RedisConfig::default()
    };
    assert_eq!(config, expected);
}

#[test]
fn redis_booleans_read_the_way_python_wrote_them() {
    for (text, expected) in [
        ("False", false),
        ("0", false),
        ("TRUE", true),
        ("yes", true),
    ] {
        let config = load(
            &[],
            &[TOKEN_ENV, ("REDIS_HOST", "r"), ("REDIS_USE_SSL", text)],
        )
        .unwrap();
        assert_eq!(config.redis.tls, expected, "REDIS_USE_SSL={text}");
    }
    let message = error(
        &[],
        &[
            TOKEN_ENV,
            ("REDIS_HOST", "r"),
            ("USE_CLUSTER_MODE", "maybe"),
        ],
    );
    assert_mentions(&message, &["USE_CLUSTER_MODE", "maybe"]);
}

#[test]
fn bad_redis_numbers_name_the_variable() {
    let message = error(
        &[],
        &[TOKEN_ENV, ("REDIS_HOST", "r"), ("REDIS_PORT", "70000")],
    );
    assert_mentions(&message, &["REDIS_PORT", "70000"]);
    let message = error(
        &[],
        &[TOKEN_ENV, ("REDIS_HOST", "r"), ("REDIS_SCAN_COUNT", "many")],
    );
    assert_mentions(&message, &["REDIS_SCAN_COUNT", "many"]);
    let message = error(
        &[],
        &[TOKEN_ENV, ("REDIS_HOST", "r"), ("REDIS_SCAN_COUNT", "0")],
    );
    assert_mentions(
        &message,
        &["redis.scan_count", "REDIS_SCAN_COUNT", "at least 1"],
    );
    let message = error(
        &[],
        &[
            TOKEN_ENV,
            ("REDIS_HOST", "r"),
            ("CACHE_UPDATE_INTERVAL_SECONDS", "-1"),
        ],
    );
    assert_mentions(&message, &["CACHE_UPDATE_INTERVAL_SECONDS", "-1"]);
}

#[test]
fn nats_url_and_redis_host_together_are_refused() {
    let message = error(
        &[],
        &[
            TOKEN_ENV,
            ("REDIS_HOST", "redis.internal"),
            ("NATS_URL", "nats://n:4222"),
        ],
    );
    assert_mentions(&message, &["NATS_URL", "REDIS_HOST", "unset one"]);
}

#[test]
fn redis_password_comes_from_one_place_only() {
    let message = error(
        &[("a.toml", "[redis]\npassword_file = \"/run/pw\"\n")],
        &[TOKEN_ENV, ("REDIS_HOST", "r"), ("REDIS_PASSWORD", "pw")],
    );
    assert_mentions(
        &message,
        &[
            "redis.password_file",
            "a.toml",
            "REDIS_PASSWORD",
            "not both",
        ],
    );
}

#[test]
fn redis_password_from_the_environment_is_taken_verbatim() {
    let config = load(
        &[],
        &[
            TOKEN_ENV,
            ("REDIS_HOST", "r"),
            ("FLAGSMITH_SSE_REDIS__PASSWORD", "000123"),
        ],
    )
    .unwrap();
    assert_eq!(config.redis.password.unwrap().expose(), "000123");
}

#[test]
fn redis_ca_file_needs_tls() {
    let message = error(
        &[("a.toml", "[redis]\ntls_ca_file = \"/etc/ca.pem\"\n")],
        &[TOKEN_ENV, ("REDIS_HOST", "r")],
    );
    assert_mentions(&message, &["redis.tls_ca_file", "a.toml", "REDIS_USE_SSL"]);
}

#[test]
fn redis_namespace_cannot_break_the_hash_tag() {
    let message = error(
        &[(
            "a.toml",
            "backend = \"redis\"\n[redis]\nnamespace = \"a}b\"\n",
        )],
        &[TOKEN_ENV],
    );
    assert_mentions(&message, &["redis.namespace", "a.toml", "'}'"]);
}

#[test]
fn missing_config_file_is_an_error_not_skipped() {
    let (missing, result) = jailed(&[TOKEN_ENV], |dir| {
        let present = dir.join("present.toml");
        std::fs::write(&present, "").unwrap();
        let missing = dir.join("missing.toml");
        let result = Config::load(&[present, missing.clone()]);
        (missing, result)
    });
    let err = result.expect_err("a missing file is an error");
    assert!(
        matches!(&err, ConfigError::MissingFile(path) if *path == missing),
        "{err:?}"
    );
    assert_mentions(
        &err.to_string(),
        &[&missing.display().to_string(), "does not exist"],
    );
}

// Errors name exactly where each value came from: which file, which variable.

#[test]
fn validation_error_names_the_file_that_set_the_value() {
    // With layered files, "from TOML file" leaves the operator to guess which one.
    let message = error(
        &[
            ("base.toml", "publish_timeout = 1"),
            ("override.toml", "publish_timeout = 3"),
        ],
        &[TOKEN_ENV],
    );
    assert_mentions(&message, &["`publish_timeout`", "override.toml"]);
}

#[test]
fn errors_about_defaults_do_not_name_a_rust_type() {
    let missing_token = error(&[("empty.toml", "")], &[]);
    let raised_drain_period = error(
        &[("empty.toml", "")],
        &[TOKEN_ENV, ("FLAGSMITH_SSE_SHUTDOWN__DRAIN_PERIOD", "30")],
    );
    for message in [missing_token, raised_drain_period] {
        assert!(!message.contains("flagsmith_sse::"), "{message}");
    }
}

#[test]
fn shutdown_error_names_where_both_values_came_from() {
    let message = error(
        &[("site.toml", "[shutdown]\ntimeout = 25")],
        &[TOKEN_ENV, ("FLAGSMITH_SSE_SHUTDOWN__DRAIN_PERIOD", "30")],
    );
    assert_mentions(
        &message,
        &[
            "shutdown.timeout",
            "TOML file",
            "shutdown.drain_period",
            "FLAGSMITH_SSE_",
        ],
    );
}

#[test]
fn token_conflict_names_where_both_came_from() {
    // The likely case: the old image's variable is still set when the credential file is
    // configured.
    let message = error(
        &[("site.toml", r#"authentication_token_file = "/run/token""#)],
        &[("SSE_AUTHENTICATION_TOKEN", "legacy-token")],
    );
    assert_mentions(
        &message,
        &[
            "authentication_token_file",
            "TOML file",
            "SSE_AUTHENTICATION_TOKEN",
        ],
    );
}

// The command line of the real binary

fn run_binary(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Output {
    // `env_clear` rather than removing known names: tests running alongside set variables
    // inside their jails, and the binary must see only what this test gives it.
    Command::new(env!("CARGO_BIN_EXE_flagsmith-sse"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .expect("the binary runs")
}

fn check_config(config: &Path, env: &[(&str, &str)]) -> Output {
    let config_arg = config.to_str().unwrap();
    run_binary(
        &["--config", config_arg, "--check-config"],
        config.parent().unwrap(),
        env,
    )
}

#[test]
fn help_lists_serve_and_check_config() {
    let output = run_binary(&["--help"], Path::new(EXAMPLE).parent().unwrap(), &[]);
    assert!(output.status.success(), "{output:?}");
    let help = String::from_utf8_lossy(&output.stdout);
    assert_mentions(
        &help,
        &["serve", "check-config", "--check-config", "--config"],
    );
}

#[test]
fn check_config_is_also_a_command_and_takes_config_after_it() {
    let dir = Path::new(EXAMPLE).parent().unwrap();
    for args in [
        ["check-config", "--config", EXAMPLE],
        ["--config", EXAMPLE, "check-config"],
    ] {
        let output = run_binary(&args, dir, &[]);
        assert!(output.status.success(), "{args:?}: {output:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "configuration ok\n"
        );
    }
    // The command validates as the flag does: a bad value is still exit code 2.
    let output = run_binary(
        &["check-config", "--config", EXAMPLE],
        dir,
        &[("MAX_STREAM_AGE", "soon")],
    );
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_mentions(
        &String::from_utf8_lossy(&output.stderr),
        &["`MAX_STREAM_AGE`"],
    );
}

#[test]
fn unknown_commands_are_refused_with_exit_code_2() {
    let output = run_binary(&["start"], Path::new(EXAMPLE).parent().unwrap(), &[]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_mentions(&String::from_utf8_lossy(&output.stderr), &["start"]);
}

#[test]
fn check_config_accepts_the_example() {
    let output = check_config(Path::new(EXAMPLE), &[]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "configuration ok\n"
    );
}

#[test]
fn check_config_rejects_an_invalid_file_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("site.toml");
    std::fs::write(&config, "authentication_token = \"x\"\nbogus = 1\n").unwrap();
    let output = check_config(&config, &[]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_mentions(&stderr, &["configuration error", "`bogus`", "site.toml"]);
}

#[test]
fn check_config_reads_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("site.toml");
    std::fs::write(&config, "authentication_token = \"x\"\n").unwrap();
    let output = check_config(&config, &[("LISTEN_ADDR", "localhost:8088")]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_mentions(&stderr, &["listen", "`LISTEN_ADDR`"]);
}

#[test]
fn check_config_does_not_need_the_token_file_to_exist() {
    // NixOS checks the configuration at build time, before the credential exists.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("not-yet-a-credential");
    let config = dir.path().join("site.toml");
    std::fs::write(
        &config,
        format!(
            "authentication_token_file = {:?}\n",
            token_file.display().to_string()
        ),
    )
    .unwrap();
    assert!(!token_file.exists());
    let output = check_config(&config, &[]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "configuration ok\n"
    );
}

// The example file

#[test]
fn example_config_is_the_defaults_plus_a_token_file() {
    let config = jailed(&[], |_| Config::load(&[PathBuf::from(EXAMPLE)])).unwrap();
    let expected = Config {
        authentication_token_file: Some(PathBuf::from(EXAMPLE_TOKEN_FILE)),
        ..Config::default()
    };
    assert_eq!(config, expected);
}

/// The example with its commented-out settings (`# key = value`) enabled.
fn example_with_every_setting() -> String {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    text.lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(setting)
                if setting.split_once(" = ").is_some_and(|(key, _)| {
                    key.chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
                }) =>
            {
                setting
            }
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn leaf_keys(dict: &Dict, prefix: &str, keys: &mut Vec<String>) {
    for (key, value) in dict {
        let path = format!("{prefix}{key}");
        match value {
            Value::Dict(_, nested) => leaf_keys(nested, &format!("{path}."), keys),
            _ => keys.push(path),
        }
    }
}

#[test]
fn example_config_lists_every_key() {
    let example = Figment::from(Toml::string(&example_with_every_setting()));
    // Types checked too, and `deny_unknown_fields` catches a misspelt commented-out key.
    let enabled: Config = example.extract().unwrap();
    assert!(enabled.authentication_token.is_some());
    assert!(enabled.nats.credentials_file.is_some());
    assert!(enabled.redis.password_file.is_some());
    assert!(enabled.redis.tls_ca_file.is_some());
    assert!(enabled.tls.is_some());
    assert!(enabled.publish_listen.is_some());
    assert!(enabled.publish_tls.is_some());

    let defaults = Serialized::defaults(Config::default()).data().unwrap();
    let mut keys = Vec::new();
    leaf_keys(&defaults[&Profile::Default], "", &mut keys);
    assert!(keys.contains(&"nats.credentials_file".to_owned()));
    let missing: Vec<_> = keys
        .iter()
        .filter(|key| example.find_value(key).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "keys missing from {EXAMPLE}: {missing:?}"
    );
}
