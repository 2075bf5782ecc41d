//! The deployment examples users copy, held true: `etc/compose.yaml` (Docker Compose) and
//! `etc/helm/values-flagsmith-sse.yaml` (Flagsmith's own Helm chart). Every variable they give
//! the service is one it reads, the service then listens where the rest of the deployment
//! looks for it, and every probe path answers. (`container/test` runs the image itself.)

mod common;

use std::collections::BTreeMap;

use figment::Jail;
use flagsmith_sse::Config;
use flagsmith_sse::config::{BackendKind, ENV_PREFIX, legacy_variables};
use yaml_rust2::{Yaml, YamlLoader};

const COMPOSE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/etc/compose.yaml");
const HELM_VALUES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/etc/helm/values-flagsmith-sse.yaml"
);
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What Flagsmith's chart (flagsmith-charts, chart 0.81.0) fixes in its `sse` templates: the
/// container and Service port, which the liveness probe uses whatever `service.sse.port` says,
/// and the probe paths unless the values set `sse.*Probe.path`.
const CHART_PORT: u16 = 8000;
const CHART_LIVENESS_PATH: &str = "/health/liveness/";
const CHART_READINESS_PATH: &str = "/health/readiness/";
/// The chart puts the token from its Secret into this variable.
const CHART_TOKEN_VARIABLE: &str = "SSE_AUTHENTICATION_TOKEN";
/// The image's user (container/build).
const IMAGE_USER: i64 = 65532;

fn yaml(path: &str) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap();
    let mut documents = YamlLoader::load_from_str(&text).unwrap_or_else(|err| {
        panic!("{path} is not YAML: {err}");
    });
    assert_eq!(documents.len(), 1, "{path}: one document");
    documents.remove(0)
}

/// A mapping of variables as Compose and the chart's `quote` turn it into an environment.
fn variables(map: &Yaml) -> BTreeMap<String, String> {
    let hash = map
        .as_hash()
        .unwrap_or_else(|| panic!("a mapping: {map:?}"));
    hash.iter()
        .filter(|(name, _)| name.as_str() != Some("<<"))
        .map(|(name, value)| {
            let value = match value {
                Yaml::String(text) | Yaml::Real(text) => text.clone(),
                Yaml::Integer(number) => number.to_string(),
                Yaml::Boolean(flag) => flag.to_string(),
                other => panic!("{name:?}: a scalar, not {other:?}"),
            };
            (name.as_str().unwrap().to_owned(), value)
        })
        .collect()
}

/// Compose's `${NAME}`, `${NAME:?message}` and `${NAME:-default}`, with `NAME` set to `value`.
fn interpolate(text: &str, name: &str, value: &str) -> String {
    let Some(start) = text.find("${") else {
        return text.to_owned();
    };
    let end = start + text[start..].find('}').expect("a closing brace");
    let reference = &text[start + 2..end];
    let referenced = reference.split([':', '-', '?']).next().unwrap();
    assert_eq!(referenced, name, "only {name} is interpolated here: {text}");
    format!("{}{value}{}", &text[..start], &text[end + 1..])
}

/// Every variable is one the service reads: its own `FLAGSMITH_SSE_*` (whose keys the
/// configuration checks when it loads) or one of the replaced images'.
#[track_caller]
fn assert_read_by_the_service(source: &str, environment: &BTreeMap<String, String>) {
    let legacy: Vec<&str> = legacy_variables().collect();
    for name in environment.keys() {
        assert!(
            name.starts_with(ENV_PREFIX) || legacy.contains(&name.as_str()),
            "{source} sets {name}, which flagsmith-sse does not read; it reads {ENV_PREFIX}* \
             and {legacy:?}"
        );
    }
}

/// The configuration the service builds from exactly `environment`.
#[allow(clippy::result_large_err)] // `Jail` requires its closure to return `figment::Result`.
fn load(environment: &BTreeMap<String, String>) -> Config {
    let mut loaded = None;
    Jail::expect_with(|jail| {
        jail.clear_env();
        for (name, value) in environment {
            jail.set_env(name, value);
        }
        loaded = Some(Config::load(&[]));
        Ok(())
    });
    loaded
        .unwrap()
        .unwrap_or_else(|err| panic!("{environment:?} does not load: {err}"))
}

/// "30s", "1m30s": Compose's durations, in seconds.
fn compose_seconds(text: &str) -> f64 {
    let mut seconds = 0.0;
    let mut number = String::new();
    for character in text.chars() {
        match character {
            '0'..='9' | '.' => number.push(character),
            'h' | 'm' | 's' => {
                let unit = match character {
                    'h' => 3600.0,
                    'm' => 60.0,
                    _ => 1.0,
                };
                seconds += number.parse::<f64>().unwrap() * unit;
                number.clear();
            }
            _ => panic!("not a Compose duration: {text}"),
        }
    }
    assert!(number.is_empty(), "not a Compose duration: {text}");
    seconds
}

#[test]
fn compose_gives_the_service_only_variables_it_reads_and_the_api_reaches_it() {
    let compose = yaml(COMPOSE);
    let services = &compose["services"];
    let sse = &services["sse"];
    assert_eq!(
        sse["image"].as_str(),
        Some(&*format!("flagsmith-sse:{VERSION}"))
    );

    let mut environment = variables(&sse["environment"]);
    assert_read_by_the_service(COMPOSE, &environment);
    for value in environment.values_mut() {
        *value = interpolate(value, "SSE_AUTHENTICATION_TOKEN", "compose-token");
    }
    let config = load(&environment);
    assert_eq!(config.backend, BackendKind::Redis);
    assert!(
        services[config.redis.host.as_str()].as_hash().is_some(),
        "REDIS_HOST {} is a service of the file",
        config.redis.host
    );
    assert_eq!(
        config
            .authentication_token
            .as_ref()
            .map(|token| token.expose()),
        Some("compose-token")
    );

    // The published port leads to where the service listens.
    let ports: Vec<&str> = sse["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|port| port.as_str().unwrap())
        .collect();
    let listen_port = config.listen.0.port();
    assert!(
        ports
            .iter()
            .any(|port| port.rsplit(':').next() == Some(&*listen_port.to_string())),
        "ports {ports:?} publish {listen_port}"
    );

    // Flagsmith's API and task processor post to the service, with the token it checks.
    let api = variables(&compose["x-flagsmith-env"]);
    assert_eq!(
        api["SSE_SERVER_BASE_URL"],
        format!("http://sse:{listen_port}")
    );
    assert_eq!(
        interpolate(
            &api["SSE_AUTHENTICATION_TOKEN"],
            "SSE_AUTHENTICATION_TOKEN",
            "compose-token"
        ),
        "compose-token"
    );
    for client in ["flagsmith", "flagsmith_processor"] {
        assert_eq!(
            variables(&services[client]["environment"]["<<"]),
            api,
            "{client} gets the SSE settings"
        );
    }

    // The drain fits in the grace period before Compose sends SIGKILL.
    let grace = compose_seconds(sse["stop_grace_period"].as_str().unwrap());
    assert!(
        grace > config.shutdown.timeout.duration().as_secs_f64(),
        "stop_grace_period {grace} s, shutdown.timeout {:?}",
        config.shutdown.timeout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_values_give_the_service_only_variables_it_reads_on_the_charts_port_and_probes() {
    let values = yaml(HELM_VALUES);
    let sse = &values["sse"];
    assert_eq!(sse["enabled"].as_bool(), Some(true));
    assert_eq!(sse["image"]["tag"].as_str(), Some(VERSION));
    assert!(
        sse["image"]["repository"]
            .as_str()
            .unwrap()
            .ends_with("/flagsmith-sse"),
        "{:?}",
        sse["image"]
    );

    // The environment the chart builds: extraEnv, extraEnvFromSecret, then the token.
    let mut environment = variables(&sse["extraEnv"]);
    if let Some(from_secrets) = sse["extraEnvFromSecret"].as_hash() {
        for name in from_secrets.keys() {
            environment.insert(
                name.as_str().unwrap().to_owned(),
                "from-a-secret".to_owned(),
            );
        }
    }
    environment.insert(CHART_TOKEN_VARIABLE.to_owned(), "chart-token".to_owned());
    assert_read_by_the_service(HELM_VALUES, &environment);
    let config = load(&environment);
    assert_eq!(config.backend, BackendKind::Redis);
    assert_eq!(config.listen.0.port(), CHART_PORT, "the chart's port");

    // The pod runs as the image's user, and the drain fits in the termination grace period.
    assert_eq!(
        sse["podSecurityContext"]["runAsUser"].as_i64(),
        Some(IMAGE_USER)
    );
    assert_eq!(
        sse["podSecurityContext"]["runAsGroup"].as_i64(),
        Some(IMAGE_USER)
    );
    let grace = sse["terminationGracePeriodSeconds"].as_i64().unwrap() as f64;
    assert!(grace > config.shutdown.timeout.duration().as_secs_f64());

    // The probe paths the chart will use answer on a running service.
    let probe =
        |name: &str, default: &str| sse[name]["path"].as_str().unwrap_or(default).to_owned();
    let service = common::Service::start_ready(common::test_config()).await;
    let client = reqwest::Client::new();
    for path in [
        probe("livenessProbe", CHART_LIVENESS_PATH),
        probe("readinessProbe", CHART_READINESS_PATH),
    ] {
        let status = client
            .get(service.url(&path))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{path}");
    }
    service.stop().await;
}
