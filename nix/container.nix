# The container image, for Nix users: what container/build makes, from the Nix package. The
# same user (65532), entrypoint, command (`serve`), ports and labels; the files come from the
# store instead of the build machine. `nix build .#container && ./result | docker load`.
{ lib
, dockerTools
, writeTextDir
, cacert
, flagsmith-sse
  # The commit, and its time as the flake gives it (`lastModifiedDate`, YYYYMMDDhhmmss).
, revision
, lastModifiedDate
}:

let
  date = lastModifiedDate;
  created = "${lib.substring 0 4 date}-${lib.substring 4 2 date}-${lib.substring 6 2 date}T"
    + "${lib.substring 8 2 date}:${lib.substring 10 2 date}:${lib.substring 12 2 date}Z";
  manifest = (lib.importTOML ../Cargo.toml).package;
in
dockerTools.streamLayeredImage {
  name = "flagsmith-sse";
  tag = flagsmith-sse.version;
  inherit created;

  contents = [
    # /etc/ssl/certs/ca-certificates.crt, for TLS to a managed Redis or NATS.
    cacert
    (writeTextDir "etc/passwd" ''
      root:x:0:0:root:/root:/sbin/nologin
      nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin
    '')
    (writeTextDir "etc/group" ''
      root:x:0:
      nonroot:x:65532:
    '')
    (writeTextDir "etc/nsswitch.conf" ''
      hosts: files dns
    '')
  ];
  extraCommands = ''
    mkdir -m 1777 tmp
  '';

  config = {
    User = "65532:65532";
    WorkingDir = "/";
    Entrypoint = [ (lib.getExe flagsmith-sse) ];
    Cmd = [ "serve" ];
    ExposedPorts = {
      "8088/tcp" = { };
      "8000/tcp" = { };
    };
    StopSignal = "SIGTERM";
    Labels = {
      "org.opencontainers.image.title" = "flagsmith-sse";
      "org.opencontainers.image.description" = manifest.description;
      "org.opencontainers.image.version" = flagsmith-sse.version;
      "org.opencontainers.image.revision" = revision;
      "org.opencontainers.image.licenses" = manifest.license;
      "org.opencontainers.image.created" = created;
    };
  };
}
