# TLS and HTTP/2 through the module: a client machine subscribes over HTTP/2 with TLS through
# the opened firewall; publishing works only on the internal publish listener.
{ self, pkgs }:

let
  # A throw-away certificate authority for the test; real deployments use ACME or their own.
  certificates = pkgs.runCommand "flagsmith-sse-test-certificates"
    { nativeBuildInputs = [ pkgs.openssl ]; } ''
    mkdir $out
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
      -subj /CN=server -addext subjectAltName=DNS:server \
      -keyout $out/key.pem -out $out/cert.pem
  '';
in
pkgs.testers.runNixOSTest {
  name = "flagsmith-sse-tls";

  nodes.server = { pkgs, ... }: {
    imports = [ self.nixosModules.default ];
    environment.systemPackages = [ pkgs.curl ];

    # Copied out of the store at boot, as a secret manager would place them.
    systemd.tmpfiles.rules = [
      "f /run/keys/flagsmith-sse-token 0400 root root - vm-test-token"
      "C /run/keys/tls-cert.pem 0400 root root - ${certificates}/cert.pem"
      "C /run/keys/tls-key.pem 0400 root root - ${certificates}/key.pem"
    ];

    services.flagsmith-sse = {
      enable = true;
      openFirewall = true;
      authenticationTokenFile = "/run/keys/flagsmith-sse-token";
      tls.certificateFile = "/run/keys/tls-cert.pem";
      tls.keyFile = "/run/keys/tls-key.pem";
      settings = {
        listen = "0.0.0.0:8443";
        publish_listen = "127.0.0.1:8089";
        max_stream_age = 0;
      };
    };
  };

  nodes.client = { pkgs, ... }: {
    environment.systemPackages = [ pkgs.curl ];
    environment.etc."flagsmith-sse-test-ca.pem".source = "${certificates}/cert.pem";
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

    # A certificate reload keeps the open stream.
    server.succeed("systemctl reload flagsmith-sse.service")
    client.succeed("systemctl is-active subscriber.service")
  '';
}
