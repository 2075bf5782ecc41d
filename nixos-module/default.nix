{ config, lib, pkgs, ... }:

let
  inherit (lib) mkEnableOption mkIf mkOption types literalExpression;

  cfg = config.services.flagsmith-sse;
  settingsFormat = pkgs.formats.toml { };

  # The daemon reads each secret where it lies, as a member of secretsGroup, so that a reload
  # re-reads a replaced file: LoadCredential would copy it once, when the service starts (as
  # systemd 252 and 257 do). Nothing secret enters the Nix store.
  secretsGroup = "flagsmith-sse-secrets";
  secretFiles = lib.filterAttrs (_: secret: secret.source != null) {
    authentication_token = {
      source = cfg.authenticationTokenFile;
      variable = "FLAGSMITH_SSE_AUTHENTICATION_TOKEN_FILE";
    };
    tls_certificate = {
      source = cfg.tls.certificateFile;
      variable = "FLAGSMITH_SSE_TLS__CERTIFICATE_FILE";
    };
    tls_key = {
      source = cfg.tls.keyFile;
      variable = "FLAGSMITH_SSE_TLS__KEY_FILE";
    };
    publish_tls_certificate = {
      source = cfg.publishTls.certificateFile;
      variable = "FLAGSMITH_SSE_PUBLISH_TLS__CERTIFICATE_FILE";
    };
    publish_tls_key = {
      source = cfg.publishTls.keyFile;
      variable = "FLAGSMITH_SSE_PUBLISH_TLS__KEY_FILE";
    };
    redis_password = {
      source = cfg.redis.passwordFile;
      variable = "FLAGSMITH_SSE_REDIS__PASSWORD_FILE";
    };
  };
  secretEnvironment = lib.mapAttrs'
    (_: secret: lib.nameValuePair secret.variable (toString secret.source))
    secretFiles;

  configFile = settingsFormat.generate "flagsmith-sse.toml" cfg.settings;
  # The daemon checks the configuration as it will run it, with the secret variables set;
  # --check-config reads no secret file, so this works at build time.
  checkedConfigFile = pkgs.runCommand "flagsmith-sse-config.toml"
    {
      nativeBuildInputs = [ cfg.package ];
      env = secretEnvironment;
    } ''
    flagsmith-sse --config ${configFile} --check-config
    ln -s ${configFile} $out
  '';

  portOf = address: lib.toInt (lib.last (lib.splitString ":" address));
  isStorePath = path: lib.hasPrefix "${builtins.storeDir}/" (toString path);

  tlsOptions = listener: {
    certificateFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/var/lib/acme/sse.example.com/fullchain.pem";
      description = ''
        PEM certificate chain (leaf first) for TLS on the ${listener} listener, read by the
        service as a member of group `${secretsGroup}` (or of
        {option}`services.flagsmith-sse.supplementaryGroups`). Re-read on
        `systemctl reload flagsmith-sse`: new handshakes get the new pair, open connections
        keep theirs.
      '';
    };
    keyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/var/lib/acme/sse.example.com/key.pem";
      description = ''
        PEM private key of {option}`certificateFile`, readable the same way; never a path in
        the Nix store.
      '';
    };
  };
in
{
  options.services.flagsmith-sse = {
    enable = mkEnableOption "flagsmith-sse, real-time Flagsmith flag updates over Server-Sent Events";

    package = lib.mkPackageOption pkgs "flagsmith-sse" { };

    settings = mkOption {
      default = { };
      description = ''
        Configuration of the daemon, written as TOML; see `etc/flagsmith-sse.toml` in the
        source for every key and its default. Secrets do not belong here: use
        {option}`authenticationTokenFile`, {option}`redis.passwordFile` and the TLS file
        options.
      '';
      example = literalExpression ''
        {
          listen = "0.0.0.0:8443";
          publish_listen = "10.0.0.5:8089";
          max_stream_age = 60;
          http2.max_concurrent_streams = 2000;
        }
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options.listen = mkOption {
          type = types.str;
          default = "0.0.0.0:8088";
          description = ''
            Address of the public listener (streams and health; publishes too unless
            `publish_listen` is set). {option}`openFirewall` opens its port.
          '';
        };
      };
    };

    authenticationTokenFile = mkOption {
      type = types.path;
      example = "/run/secrets/flagsmith-sse-token";
      description = ''
        File holding the token Flagsmith's task processor sends as
        `Authorization: Token <token>`. The service reads it as a member of group
        `${secretsGroup}`: make it `root:${secretsGroup}`, mode `0640` (with sops-nix or agenix,
        their `group` and `mode` options). Rotate it by replacing the file and running
        `systemctl reload flagsmith-sse`. Must not be in the Nix store.
      '';
    };

    tls = tlsOptions "public";
    publishTls = tlsOptions "publish (`settings.publish_listen`)";

    supplementaryGroups = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = literalExpression ''[ config.security.acme.certs."sse.example.com".group ]'';
      description = ''
        Further groups the service's dynamic user joins besides `${secretsGroup}`, to read
        secret files owned by them: an ACME certificate shared with a web server, say.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open the public listener's port. The publish listener, meant for an internal address,
        stays closed.
      '';
    };

    nats.createLocally = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Run a JetStream NATS on this machine, bound to 127.0.0.1 ({option}`services.nats`),
        and use it. Turn off to share a NATS with other instances: then set
        `settings.backend = "nats"` and `settings.nats.url`, or use Redis with
        `settings.backend = "redis"` and `settings.redis`.
      '';
    };

    redis.passwordFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/flagsmith-sse-redis-password";
      description = ''
        File holding the password for `settings.backend = "redis"`, readable as the token is.
        Re-read on `systemctl reload flagsmith-sse`, which reconnects with a changed password.
        Must not be in the Nix store.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions =
      lib.mapAttrsToList
        (name: secret: {
          assertion = !isStorePath secret.source;
          message = "services.flagsmith-sse: the ${name} file (${toString secret.source}) is in the Nix store, readable by every user; pass a path outside it.";
        })
        secretFiles
      ++ lib.mapAttrsToList
        (option: tls: {
          assertion = (tls.certificateFile == null) == (tls.keyFile == null);
          message = "services.flagsmith-sse.${option}: set both certificateFile and keyFile, or neither.";
        })
        { inherit (cfg) tls publishTls; }
      ++ [{
        assertion = cfg.nats.createLocally -> cfg.settings.backend == "nats";
        message = "services.flagsmith-sse: settings.backend is \"${cfg.settings.backend}\", but nats.createLocally would run a NATS for nothing; set nats.createLocally = false.";
      }];

    services.flagsmith-sse.settings = mkIf cfg.nats.createLocally {
      backend = lib.mkDefault "nats";
      nats.url = "nats://127.0.0.1:${toString config.services.nats.port}";
    };

    services.nats = mkIf cfg.nats.createLocally {
      enable = true;
      jetstream = true;
      settings.host = "127.0.0.1";
    };

    users.groups.${secretsGroup} = { };

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ (portOf cfg.settings.listen) ];

    systemd.services.flagsmith-sse = {
      description = "flagsmith-sse, real-time Flagsmith flag updates";
      documentation = [ "https://docs.flagsmith.com/advanced-use/real-time-flags" ];
      wantedBy = [ "multi-user.target" ];
      # The service rides out NATS restarts by itself: order after a local NATS, but do not
      # let its restarts stop this unit.
      wants = [ "network-online.target" ] ++ lib.optional cfg.nats.createLocally "nats.service";
      after = [ "network-online.target" ] ++ lib.optional cfg.nats.createLocally "nats.service";
      environment = secretEnvironment;

      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${lib.getExe cfg.package} --config ${checkedConfigFile}";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        SupplementaryGroups = [ secretsGroup ] ++ cfg.supplementaryGroups;
        Restart = "on-failure";
        RestartSec = 2;
        WatchdogSec = 30;
        # READY=1 waits for the backend; while NATS is away the service already serves
        # liveness and streams, so systemd should wait rather than kill it.
        TimeoutStartSec = "infinity";
        # Above the daemon's own shutdown.timeout, after which it exits by itself.
        TimeoutStopSec = (cfg.settings.shutdown.timeout or 20) + 10;

        # Every subscriber is a socket.
        LimitNOFILE = 1048576;

        DynamicUser = true;
        UMask = "0077";
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        PrivateUsers = true;
        ProtectClock = true;
        ProtectControlGroups = true;
        ProtectHostname = true;
        ProtectKernelLogs = true;
        ProtectKernelModules = true;
        ProtectKernelTunables = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        RemoveIPC = true;
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged" "~@resources" ];
        # A filtered call fails with EPERM instead of killing the process. (Raising the
        # open-files limit to LimitNOFILE at start is not filtered: glibc makes it the prlimit64
        # system call, which @resources does not hold.)
        SystemCallErrorNumber = "EPERM";
      };
    };
  };
}
