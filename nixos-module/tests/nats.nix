# The module with its local JetStream NATS: the unit becomes ready, a subscriber sees an
# update published with the token, a token replaced and reloaded is taken while a stream stays
# open, and restart behaves.
{ self, pkgs }:

pkgs.testers.runNixOSTest {
  name = "flagsmith-sse-nats";

  nodes.machine = { pkgs, ... }: {
    imports = [ self.nixosModules.default ];

    # A real deployment gets the token from a secret manager (sops-nix writes to /run/secrets);
    # it must not be in the store, and the module's group reads it.
    systemd.tmpfiles.rules = [
      "d /run/secrets 0751 root root -"
      "f /run/secrets/flagsmith-sse-token 0440 root flagsmith-sse-secrets - vm-test-token"
    ];

    services.flagsmith-sse = {
      enable = true;
      authenticationTokenFile = "/run/secrets/flagsmith-sse-token";
      settings.max_stream_age = 0;
    };

    environment.systemPackages = [ pkgs.curl ];
  };

  testScript = ''
    stream = "http://127.0.0.1:8088/sse/environments/vm-environment/stream"
    queue_change = "http://127.0.0.1:8088/sse/environments/vm-environment/queue-change"

    machine.wait_for_unit("nats.service")
    # Type=notify: active only once NATS is connected and the stream exists.
    machine.wait_for_unit("flagsmith-sse.service")
    machine.succeed("curl -sf http://127.0.0.1:8088/readyz")

    machine.succeed(
        f"systemd-run --unit=subscriber -- ${pkgs.bash}/bin/sh -c '${pkgs.curl}/bin/curl -sN {stream} > /tmp/events'"
    )
    machine.wait_until_succeeds("systemctl is-active subscriber.service")

    token = "vm-test-token"
    machine.succeed(
        f"curl -sf -X POST -H 'Authorization: Token {token}' "
        + f"""-d '{{"updated_at": 1700000000.5}}' {queue_change}"""
    )
    machine.wait_until_succeeds("grep -q '^event: environment_updated$' /tmp/events")
    machine.succeed("grep -q '^data: {\"updated_at\": 1700000000.5}$' /tmp/events")
    machine.fail(f"curl -sf -X POST -H 'Authorization: Token wrong' -d '{{}}' {queue_change}")
    metrics = machine.succeed("curl -sf http://127.0.0.1:8088/metricsz")
    assert 'flagsmith_sse_publish_requests_total{outcome="stored"} 1' in metrics, metrics
    assert 'flagsmith_sse_backend_ready{backend="nats"} 1' in metrics, metrics

    # Rotation: the file replaced as a secret manager does, then a reload (RELOADING=1, then
    # READY=1). The new token is taken, the old one refused, and the stream stays open.
    machine.succeed(
        "printf rotated-token | install -m 0440 -g flagsmith-sse-secrets /dev/stdin "
        + "/run/secrets/flagsmith-sse-token"
    )
    machine.succeed("systemctl reload flagsmith-sse.service")
    machine.fail(f"curl -sf -X POST -H 'Authorization: Token {token}' -d '{{}}' {queue_change}")
    machine.succeed(
        "curl -sf -X POST -H 'Authorization: Token rotated-token' "
        + f"""-d '{{"updated_at": 1700000001.5}}' {queue_change}"""
    )
    machine.wait_until_succeeds("grep -q '^data: {\"updated_at\": 1700000001.5}$' /tmp/events")
    machine.succeed("systemctl is-active subscriber.service")

    # The hardened unit: no capabilities, a dynamic user, a high open-files limit.
    pid = machine.succeed("systemctl show -p MainPID --value flagsmith-sse.service").strip()
    machine.succeed(f"grep -q '^CapEff:\\s*0000000000000000$' /proc/{pid}/status")
    machine.succeed(f"grep -q 'Max open files *1048576' /proc/{pid}/limits")
    machine.fail(f"test \"$(stat -c %U /proc/{pid})\" = root")

    # A NATS restart: the service stays up and is ready again afterwards.
    machine.succeed("systemctl restart nats.service")
    machine.wait_until_succeeds("curl -sf http://127.0.0.1:8088/readyz")
    machine.succeed("systemctl is-active flagsmith-sse.service")
  '';
}
