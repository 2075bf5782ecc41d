{ lib
, rustPlatform
, nats-server
, redis
, prometheus
}:

let
  manifest = (lib.importTOML ../Cargo.toml).package;
in
rustPlatform.buildRustPackage {
  pname = manifest.name;
  inherit (manifest) version;

  # Only what the build and its tests read, so editing the README, docs/ or the Nix files does
  # not rebuild the package.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../tests
      # The load generator, a member of the Cargo workspace: Cargo reads every member's
      # manifest, and the check phase runs its smoke test.
      ../bench/Cargo.toml
      ../bench/src
      ../bench/tests
      ../etc/flagsmith-sse.toml
      ../etc/grafana/flagsmith-sse.json
      ../etc/compose.yaml
      ../etc/helm/values-flagsmith-sse.yaml
      ../nix/demo.sh
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;
  # The service only: the check phase builds and tests the load generator, which is not installed.
  cargoBuildFlags = [ "--package" "flagsmith-sse" ];

  # The tests start real nats-server and redis-server processes (single servers, TLS and a
  # cluster) on loopback, drive them with redis-cli, and check /metricsz and the Grafana
  # dashboard's queries with promtool.
  nativeCheckInputs = [ nats-server redis prometheus.cli ];
  checkFlags = [
    # Needs the Flagsmith Python SDK from PyPI, which nixpkgs does not package; `.ci/run` and
    # the GitHub workflow run it.
    "--skip=python_sdk_sees_a_change_within_a_second"
    # Likewise the Flagsmith JavaScript SDK, which tests/js installs with npm.
    "--skip=js_sdk_reads_past_the_opening_comment_and_sees_a_change_within_a_second"
    # Reads README.md, CHANGELOG.md and docs/, which the source above leaves out so that
    # editing them does not rebuild the package; `.ci/run` runs it.
    "--skip=every_internal_link_of_the_documentation_resolves"
    # Run h2spec from its static build beside the project (shared/tools/h2spec), outside the
    # package's source; `.ci/run` runs them.
    "--skip=the_services_own_http2_passes_every_case_on_h2c_and_tls"
    "--skip=the_publish_listener_fails_only_hypers_own_cases"
  ];

  meta = {
    description = "Real-time Flagsmith flag updates over Server-Sent Events";
    mainProgram = "flagsmith-sse";
    # Cargo.toml's `MIT OR Apache-2.0`, as nixpkgs writes a choice of licences.
    license = with lib.licenses; [ mit asl20 ];
    platforms = lib.platforms.linux;
  };
}
