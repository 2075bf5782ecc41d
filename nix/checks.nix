# What `nix flake check` builds: the package (its check phase runs the Rust test suite with
# nats-server), the container image, clippy, rustfmt, the Nix formatting, and the NixOS VM
# tests of the module.
{ self, pkgs }:

let
  inherit (pkgs) lib;
  package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
  nixFiles = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.fileFilter (file: file.hasExt "nix") ../.;
  };
in
{
  inherit package;
  inherit (self.packages.${pkgs.stdenv.hostPlatform.system}) container;

  clippy = package.overrideAttrs (previous: {
    pname = "${previous.pname}-clippy";
    nativeBuildInputs = previous.nativeBuildInputs ++ [ pkgs.clippy ];
    buildPhase = ''
      runHook preBuild
      cargo clippy --frozen --all-targets -- -D warnings
      runHook postBuild
    '';
    doCheck = false;
    installPhase = "touch $out";
  });

  # rustfmt on the files themselves: `cargo fmt` would want to resolve the workspace first.
  rustfmt = pkgs.runCommand "flagsmith-sse-rustfmt"
    { nativeBuildInputs = [ pkgs.rustfmt pkgs.findutils ]; } ''
    cd ${package.src}
    find src tests -name '*.rs' -exec rustfmt --check --edition 2024 {} +
    touch $out
  '';

  nixpkgs-fmt = pkgs.runCommand "flagsmith-sse-nixpkgs-fmt"
    { nativeBuildInputs = [ pkgs.nixpkgs-fmt ]; } ''
    nixpkgs-fmt --check ${nixFiles}
    touch $out
  '';

  nixos-module = import ../nixos-module/tests/nats.nix { inherit self pkgs; };
  nixos-module-tls = import ../nixos-module/tests/tls.nix { inherit self pkgs; };
}
