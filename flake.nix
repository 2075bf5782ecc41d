{
  description = "Real-time Flagsmith flag updates over Server-Sent Events, for a fleet joined by NATS JetStream";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: _prev: {
        flagsmith-sse = final.callPackage ./nix/package.nix { };
      };

      packages = forAllSystems (pkgs: rec {
        flagsmith-sse = pkgs.callPackage ./nix/package.nix { };
        default = flagsmith-sse;
        # `nix build .#container && ./result | docker load` (or `podman load`).
        container = pkgs.callPackage ./nix/container.nix {
          inherit flagsmith-sse;
          revision = self.rev or self.dirtyRev or "unknown";
          lastModifiedDate = self.lastModifiedDate or "19700101000001";
        };
      });

      apps = forAllSystems (pkgs:
        let
          flagsmith-sse = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          demo = pkgs.callPackage ./nix/demo.nix { inherit flagsmith-sse; };
        in
        {
          default = {
            type = "app";
            program = lib.getExe flagsmith-sse;
            meta.description = "The flagsmith-sse service";
          };
          demo = {
            type = "app";
            program = lib.getExe demo;
            meta.description = "A throw-away JetStream nats-server and the service wired to it";
          };
        });

      nixosModules.flagsmith-sse = { lib, pkgs, ... }: {
        imports = [ ./nixos-module ];
        services.flagsmith-sse.package =
          lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };
      nixosModules.default = self.nixosModules.flagsmith-sse;

      checks = forAllSystems (pkgs: import ./nix/checks.nix { inherit self pkgs; });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            clippy
            rustc
            rustfmt
            nats-server
            natscli
            redis
            prometheus.cli
            nixpkgs-fmt
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);
    };
}
