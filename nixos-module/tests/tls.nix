# TLS and HTTP/2 through the module: a client machine subscribes over HTTP/2 with TLS through
# the opened firewall; publishing works only on the internal publish listener; a renewed
# certificate is served after a reload while the open stream stays.
{ self, pkgs }:

let
  # A throw-away certificate authority for the test; real deployments use ACME or their own.
  certificates = pkgs.runCommand "flagsmith-sse-test-certificates"
    { nativeBuildInputs = [ pkgs.openssl ]; } ''
    mkdir $out
    for name in first renewed; do
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -subj /CN=server -addext subjectAltName=DNS:server \
        -keyout $out/$name-key.pem -out $out/$name-cert.pem
    done
  '';
in
pkgs.testers.runNixOSTest {
  name = "flagsmith-sse-tls";

  nodes.server = { pkgs, ... }: {
    imports = [ self.nixosModules.default ];
    environment.systemPackages = [ pkgs.curl ];

    # Copied out of the store at boot, as a secret manager or ACME would place them, readable
    # by the module's group.
    systemd.tmpfiles.rules = [
      "d /var/lib/sse-secrets 0750 root flagsmith-sse-secrets -"
      "f /var/lib/sse-secrets/token 0440 root flagsmith-sse-secrets - vm-test-token"
      "C /var/lib/sse-secrets/cert.pem 0440 root flagsmith-sse-secrets - ${certificates}/first-cert.pem"
      "C /var/lib/sse-secrets/key.pem 0440 root flagsmith-sse-secrets - ${certificates}/first-key.pem"
    ];

    services.flagsmith-sse = {
      enable = true;
      openFirewall = true;
      authenticationTokenFile = "/var/lib/sse-secrets/token";
      tls.certificateFile = "/var/lib/sse-secrets/cert.pem";
      tls.keyFile = "/var/lib/sse-secrets/key.pem";
      settings = {
        listen = "0.0.0.0:8443";
        publish_listen = "127.0.0.1:8089";
        max_stream_age = 0;
      };
    };
  };

  nodes.client = { pkgs, ... }: {
    environment.systemPackages = [ pkgs.curl ];
    environment.etc."flagsmith-sse-test-ca.pem".source = "${certificates}/first-cert.pem";
    environment.etc."flagsmith-sse-renewed-ca.pem".source = "${certificates}/renewed-cert.pem";
  };

  testScript = ''
    stream = "https://server:8443/sse/environments/vm-environment/stream"
    ca = "--cacert /etc/flagsmith-sse-test-ca.pem"

    start_all()
    server.wait_for_unit("flagsmith-sse.service")
    client.wait_for_unit("multi-user.target")

    handshake = client.succeed(f"curl -sv --http2 {ca} https://server:8443/readyz 2>&1")
    assert "ALPN: server accepted h2" in handshake, handshake
    assert "HTTP/2 200" in handshake, handshake

    client.succeed(
        f"systemd-run --unit=subscriber -- ${pkgs.bash}/bin/sh -c '${pkgs.curl}/bin/curl -sN --http2 {ca} {stream} > /tmp/events'"
    )
    client.wait_until_succeeds("systemctl is-active subscriber.service")

    # queue-change is not served on the public listener once a publish listener exists ...
    client.succeed(
        f"test \"$(curl -s -o /dev/null -w '%{{http_code}}' {ca} -X POST "
        + "-H 'Authorization: Token vm-test-token' -d '{\"updated_at\": 1.5}' "
        + "https://server:8443/sse/environments/vm-environment/queue-change)\" = 404"
    )
    # ... but on the internal one.
    server.succeed(
        "curl -sf -X POST -H 'Authorization: Token vm-test-token' "
        + """-d '{"updated_at": "2024-12-26T17:27:07.123456+00:00"}' """
        + "http://127.0.0.1:8089/sse/environments/vm-environment/queue-change"
    )
    client.wait_until_succeeds("grep -q '^data: {\"updated_at\": 1735234027.123456}$' /tmp/events")

    # The publish listener is not reachable from outside.
    client.fail("curl -s --max-time 3 http://server:8089/readyz")

    # Renewal, as security.acme.certs.<name>.reloadServices does it: the pair replaced, then a
    # reload. New handshakes get the renewed certificate; the open stream stays and gets the
    # next update.
    renewed = "--cacert /etc/flagsmith-sse-renewed-ca.pem https://server:8443/readyz"
    client.fail(f"curl -sf {renewed}")
    for name in ["cert", "key"]:
        server.succeed(
            f"install -m 0440 -g flagsmith-sse-secrets ${certificates}/renewed-{name}.pem "
            + f"/var/lib/sse-secrets/{name}.pem"
        )
    server.succeed("systemctl reload flagsmith-sse.service")
    client.succeed(f"curl -sf {renewed}")
    server.succeed(
        "curl -sf -X POST -H 'Authorization: Token vm-test-token' "
        + """-d '{"updated_at": "2024-12-27T17:27:07.123456+00:00"}' """
        + "http://127.0.0.1:8089/sse/environments/vm-environment/queue-change"
    )
    client.wait_until_succeeds("grep -q '^data: {\"updated_at\": 1735320427.123456}$' /tmp/events")
    client.succeed("systemctl is-active subscriber.service")
  '';
}
