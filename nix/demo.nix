{ writeShellApplication
, coreutils
, nats-server
, flagsmith-sse
}:

writeShellApplication {
  name = "flagsmith-sse-demo";
  runtimeInputs = [ coreutils nats-server flagsmith-sse ];
  text = builtins.readFile ./demo.sh;
}
