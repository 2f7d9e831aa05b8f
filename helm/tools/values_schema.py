"""Writes helm/correu/values.schema.json, the JSON Schema `helm install`
checks the values against. Edit this file, not the JSON:

    python3 helm/tools/values_schema.py            # rewrite the schema
    python3 helm/tools/values_schema.py --check    # exit 1 if it is stale

The `config` part lists every Correu setting, so a misspelt key fails at
install time rather than in a crash-looping pod; a Rust test
(crates/runtime/tests/chart_schema.rs) checks it names exactly the keys
Correu knows.
"""

import json
import os
import sys

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "correu", "values.schema.json")


def obj(props, extra=None, **kw):
    """A closed object: unknown keys are errors."""
    o = {"type": "object", "properties": props, "additionalProperties": False}
    if extra is not None:
        o["additionalProperties"] = extra
    o.update(kw)
    return o


def s(**kw):
    return {"type": "string", **kw}


def i(minimum=0, maximum=None, **kw):
    o = {"type": "integer", "minimum": minimum, **kw}
    if maximum is not None:
        o["maximum"] = maximum
    return o


B = {"type": "boolean"}
FREE = {"type": "object", "description": "free-form map, passed to Kubernetes as it is"}
STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
ARRAY = {"type": "array", "description": "free-form list, passed to Kubernetes as it is"}
QUANTITY = {"anyOf": [{"type": "string"}, {"type": "number"}]}
RESOURCES = obj({
    "requests": obj({"cpu": QUANTITY, "memory": QUANTITY, "ephemeral-storage": QUANTITY}),
    "limits": obj({"cpu": QUANTITY, "memory": QUANTITY, "ephemeral-storage": QUANTITY}),
})
ENV = {"type": "array", "items": {"type": "object", "required": ["name"],
                                  "properties": {"name": s(minLength=1)}}}
PDB = obj({
    "enabled": B,
    "minAvailable": {"anyOf": [i(0), s(pattern="^[0-9]+%$"), {"type": "null"}],
                     "description": "when set, replaces maxUnavailable"},
    "maxUnavailable": {"anyOf": [i(0), s(pattern="^[0-9]+%$")]},
})


def scheduling():
    """What platform teams set on every workload."""
    return {
        "resources": RESOURCES,
        "nodeSelector": STRMAP,
        "tolerations": ARRAY,
        "affinity": FREE,
        "topologySpreadConstraints": dict(ARRAY, description="replaces the chart's spread over nodes and zones"),
        "podAnnotations": STRMAP,
        "podLabels": STRMAP,
        "priorityClassName": s(),
        "extraEnv": ENV,
    }


# Correu's settings (README.md, "Configuration"), by kind.
DUR = {"anyOf": [s(pattern="^[0-9]+(ms|s|m|h|d)?$"), i(0)], "description": "30s, 5m, 250ms, 2h, 5d"}
RATE = {"anyOf": [s(pattern="^(0|unlimited|[0-9]+/[0-9]+(ms|s|m|h|d)?)$"), {"const": 0}],
        "description": "N/DURATION (120/1m), or 0 for none"}
SIZE = {"anyOf": [s(pattern="^[0-9]+([kKmMgGtT][bB]?|[bB])?$"), i(0)], "description": "bytes, or 512k, 100M, 1G"}
ADDR = s(pattern=r"^(\[[0-9a-fA-F:.]+\]|[0-9.]+):[0-9]+$", description="IP:PORT")
BOUNCE_CLASSES = ["invalid_recipient", "mailbox_full", "message_too_large", "policy", "spam", "rate_limited",
                  "dns", "tls", "connection", "suppressed", "expired", "other"]
NET = s(pattern=r"^[0-9a-fA-F.:]+(/[0-9]+)?$")


def many(item):
    """A list, or one comma-separated string (as an environment variable)."""
    return {"anyOf": [{"type": "array", "items": item}, s()]}


CONFIG = obj({
    "hostname": s(),
    "domains": many(s()),
    "smtp": obj({
        "listen": many(ADDR), "trusted_networks": many(NET), "max_message_size": i(1),
        "max_recipients": i(1), "max_errors": i(1), "max_line_length": i(512),
        "max_connections": i(1), "command_timeout": DUR, "data_timeout": DUR, "min_data_rate": i(0),
        "recipient_check_timeout": DUR, "recipient_cache": DUR, "shutdown_grace": DUR,
        "drain_delay": DUR, "submission": many(ADDR), "submissions": many(ADDR),
        "tls_certificate": s(), "tls_key": s(), "tls_handshake_timeout": DUR, "auth_file": s(),
        "proxy_networks": many(NET), "proxy_timeout": DUR, "max_transactions": i(1),
        "max_text_line": i(0), "reject_bare_line_ends": B, "max_hops": i(1),
        "max_connections_per_client": i(1), "max_session_time": DUR, "connection_rate": RATE,
        "message_rate": RATE, "user_message_rate": RATE, "auth_failure_delay": DUR,
        "auth_client_failures": RATE, "auth_account_failures": RATE,
    }),
    "inbound": obj({
        "verify": B, "timeout": DUR, "authserv_id": s(pattern="^[A-Za-z0-9.-]+$"),
        "dmarc": {"enum": ["enforce", "monitor"]}, "spf_fail": {"enum": ["accept", "reject"]},
        "domains": {"type": "object", "additionalProperties": obj({
            "dmarc": {"enum": ["enforce", "monitor"]}, "spf_fail": {"enum": ["accept", "reject"]}})},
        "blocklists": {"type": "array", "items": obj({
            "zone": s(minLength=1), "kind": {"enum": ["ip", "domain"]}, "weight": {"type": "number", "minimum": 0},
            "codes": many(s(pattern=r"^[0-9.]+$"))}, required=["zone"])},
        "blocklist_threshold": {"type": "number", "exclusiveMinimum": 0},
        "greylist": obj({"enabled": B, "delay": DUR, "expire": DUR, "pass_for": DUR, "skip_domains": many(s())}),
        "milters": {"type": "array", "items": obj({
            "name": s(minLength=1), "address": s(pattern=r"^(unix:/.+|.+:[0-9]+)$"), "timeout": DUR,
            "default_action": {"enum": ["tempfail", "accept"]},
            "ports": many({"enum": ["mx", "submission", "submissions"]})}, required=["name", "address"])},
    }),
    "dns": obj({"server": ADDR, "cache_size": i(0), "trust_anchor": s()}),
    "queue": obj({
        "backend": {"enum": ["rabbitmq", "embedded"]}, "url": s(pattern="^amqps?://"),
        "prefix": s(pattern="^[A-Za-z0-9._-]+$"), "spool": s(), "publish_timeout": DUR, "confirm_timeout": DUR,
        "connect_timeout": DUR, "prefetch": i(1, 65535), "retry_delays": many(DUR), "max_age": DUR,
    }),
    "storage": obj({
        "listen": ADDR, "endpoint": s(pattern="^https?://"), "root": s(), "mailboxes": many(s()),
        "accounts_file": s(), "aliases_file": s(), "srs_secret_file": s(), "default_quota": SIZE,
        "request_timeout": DUR,
    }),
    "delivery": obj({
        "concurrency": i(1), "mx_port": i(1, 65535),
        "routes": {"type": "object", "additionalProperties": {"anyOf": [
            s(pattern=r"^.+:[0-9]+$"),
            obj({"host": s(minLength=1), "port": i(1, 65535),
                 "tls": {"enum": ["none", "opportunistic", "required", "dane"]},
                 "auth_user": s(), "auth_password_file": s()}, required=["host"]),
        ]}},
        "tls": {"enum": ["none", "opportunistic", "required", "dane"]}, "tls_ca_file": s(),
        "mta_sts": B, "mta_sts_port": i(1, 65535), "bounces": B,
        "max_connections_per_host": i(1), "domain_rate": RATE, "delay_warning": DUR,
        "connection_idle": DUR,
        "dkim": {"type": "object", "additionalProperties": obj({
            "selector": s(minLength=1), "key_file": s(minLength=1),
            "algorithm": {"enum": ["rsa-sha256", "ed25519-sha256"]}}, required=["selector", "key_file"])},
        "timeouts": obj({k: DUR for k in ("connect", "banner", "ehlo", "starttls", "mail", "rcpt", "data",
                                          "data_end")}),
        "attempt_timeout": DUR,
        "suppression": obj({"enabled": B, "ttl": DUR, "classes": many({"enum": BOUNCE_CLASSES})}),
        "tls_reports": obj({"enabled": B, "organization": s(), "contact": s()}),
        "shaping": {"type": "object", "additionalProperties": obj({
            "domains": many(s(minLength=1)), "mx": many(s(minLength=1)), "max_connections": i(1),
            "max_messages_per_connection": i(0), "message_rate": RATE, "connection_rate": RATE,
            "tls": {"enum": ["none", "opportunistic", "required", "dane"]}, "connection_idle": DUR, "backoff": DUR,
            "retry_delays": many(DUR)})},
    }),
    "redis": obj({
        "url": s(pattern="^(redis|rediss|unix)://"), "prefix": s(), "timeout": DUR, "pool_size": i(1),
    }),
    "telemetry": obj({"listen": ADDR, "span_addresses": B, "domains": many(s(minLength=1))}),
    "events": obj({"enabled": B}),
    "webhook": obj({
        "urls": many(s(pattern="^https?://.+")), "secret_file": s(), "timeout": DUR,
        "outcomes": many({"enum": ["delivered", "deferred", "bounced", "expired", "suppressed"]}),
        "concurrency": i(1), "tls_ca_file": s(),
    }),
}, description="any Correu setting, by section, exactly as in correu.toml; merged over what the chart sets")


SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "Correu Helm values",
    **obj({
        "image": obj({"repository": s(minLength=1), "tag": s(),
                      "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}),
        "imagePullSecrets": {"type": "array", "items": obj({"name": s()})},
        "hostname": s(minLength=1, pattern="^[A-Za-z0-9.-]+$", description="this server's name"),
        "domains": {"type": "array", "minItems": 1, "items": s(pattern="^[A-Za-z0-9.-]+$")},
        "logLevel": {"enum": ["error", "warn", "info", "debug", "trace"]},
        "config": CONFIG,
        "rabbitmq": obj({
            "url": s(pattern="^$|^amqps?://", description="amqps?:// URL"),
            "existingSecret": s(description="Secret holding the URL"),
            "existingSecretKey": s(minLength=1),
            "internal": obj({"enabled": B, "image": s(minLength=1)}),
        }),
        "redis": obj({
            "url": s(pattern="^$|^(redis|rediss|unix)://", description="(redis|rediss|unix):// URL"),
            "existingSecret": s(description="Secret holding the URL"),
            "existingSecretKey": s(minLength=1),
            "internal": obj({"enabled": B, "image": s(minLength=1)}),
        }),
        "telemetry": obj({
            "metrics": {"enum": ["scrape", "otlp", "both"],
                        "description": "where Prometheus gets the metrics: scrape /metrics, otlp (pushed), or both"},
            "logs": {"enum": ["stderr", "otlp"],
                     "description": "stderr: JSON lines only; otlp: also OTLP log records to otlpEndpoint"},
            "otlpEndpoint": s(pattern="^$|^https?://"),
            "otlpProtocol": {"enum": ["grpc", "http/protobuf"]},
            "tracesSampler": {"enum": ["always_on", "always_off", "traceidratio", "parentbased_always_on",
                                       "parentbased_always_off", "parentbased_traceidratio"]},
            "tracesSamplerArg": s(),
            "resourceAttributes": s(),
            "serviceMonitor": obj({"enabled": B, "interval": s(pattern="^[0-9]+(ms|s|m|h)$"),
                                   "labels": STRMAP}),
            "prometheusRule": obj({
                "enabled": B, "labels": STRMAP,
                "selector": s(pattern=r"^$|^[a-zA-Z_][a-zA-Z0-9_]*\s*(=|!=|=~|!~)\s*\".*\"$",
                              description='PromQL label matchers, e.g. namespace="mail", job=~"correu-.*"'),
            }),
        }),
        "tls": obj({"existingSecret": s(description="a kubernetes.io/tls Secret")}),
        "accounts": obj({"existingSecret": s(), "aliases": B}),
        "dkim": obj({"existingSecret": s(), "domains": {"type": "object", "additionalProperties": obj({
            "selector": s(minLength=1), "key": s(minLength=1),
            "algorithm": {"enum": ["rsa-sha256", "ed25519-sha256"]}}, required=["selector", "key"])}}),
        "srs": obj({"existingSecret": s(description="a Secret with key `secret`: signs SRS senders")}),
        "serviceAccount": obj({
            "create": B, "name": s(),
            "annotations": dict(STRMAP, description="IRSA (eks.amazonaws.com/role-arn), Workload Identity"),
        }),
        "podSecurityContext": FREE,
        "podAnnotations": STRMAP,
        "podLabels": STRMAP,
        "priorityClassName": s(),
        "extraEnv": ENV,
        "extraVolumes": ARRAY,
        "extraVolumeMounts": ARRAY,
        "ingress": obj({
            "replicas": i(1),
            "drainSeconds": i(1, 3600),
            "drainDelaySeconds": i(0, 600),
            "service": obj({
                "type": {"enum": ["LoadBalancer", "NodePort", "ClusterIP"]},
                "externalTrafficPolicy": {"enum": ["Local", "Cluster"]},
                "annotations": STRMAP,
                "loadBalancerIP": s(),
                "ports": obj({"smtp": i(1, 65535), "submission": i(1, 65535), "submissions": i(1, 65535)}),
            }),
            "proxyProtocol": obj({"enabled": B, "networks": {"type": "array", "items": NET}}),
            "autoscaling": obj({
                "enabled": B, "minReplicas": i(1), "maxReplicas": i(1),
                "targetCPUUtilizationPercentage": i(1, 100),
                "openConnections": obj({"enabled": B, "averageValue": i(1)}),
            }),
            "pdb": PDB,
            "topologySpread": B,
            **scheduling(),
        }),
        "delivery": obj({
            "replicas": i(1),
            "autoscaling": obj({"enabled": B, "minReplicas": i(1), "maxReplicas": i(1),
                                "targetCPUUtilizationPercentage": i(1, 100)}),
            "keda": obj({"enabled": B, "queueLength": i(1), "minReplicas": i(0), "maxReplicas": i(1),
                         "hostSecret": s()}),
            "pdb": PDB,
            "topologySpread": B,
            **scheduling(),
        }),
        "webhook": obj({
            "enabled": B, "urls": many(s(pattern="^https?://.+")), "existingSecret": s(),
            "replicas": i(1),
            "pdb": PDB,
            "topologySpread": B,
            **scheduling(),
        }),
        "storage": obj({
            "replicas": i(1, description="more than one needs a ReadWriteMany volume"),
            "persistence": obj({
                "existingClaim": s(), "storageClass": s(),
                "accessModes": {"type": "array", "minItems": 1,
                                "items": {"enum": ["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]}},
                "size": s(pattern="^[0-9]+(Ki|Mi|Gi|Ti)$"),
            }),
            "dovecot": obj({
                "enabled": B, "image": s(minLength=1), "imapPort": i(1, 65535),
                "serviceType": {"enum": ["ClusterIP", "LoadBalancer", "NodePort"]},
                "resources": RESOURCES,
                "extraConfig": s(description="more dovecot.conf lines"),
            }),
            "pdb": PDB,
            "topologySpread": B,
            **scheduling(),
        }),
        "networkPolicy": obj({"enabled": B, "metricsNamespace": s(minLength=1)}),
        "helmTest": obj({"enabled": B, "recipient": s(description="an address storage accepts"),
                         "timeoutSeconds": i(5, 600)}),
    }),
}


def render():
    return json.dumps(SCHEMA, indent=2) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        with open(OUT) as f:
            if f.read() != text:
                print(f"{OUT} is stale: run python3 helm/tools/values_schema.py", file=sys.stderr)
                sys.exit(1)
        sys.exit(0)
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT}")
