#!/usr/bin/env python3
"""Checks the Kubernetes manifests under deploy/kubernetes (issue 22), offline.

    .venv/bin/python cli/tests/python/k8s_manifests.py [MANIFEST_DIR]

MANIFEST_DIR defaults to <repo>/deploy/kubernetes; its JSON Schemas are read from
MANIFEST_DIR/schemas. Prints one line per check ("ok: ..." or "FAIL: ...: why"), then
"N passed, N failed", and exits 1 when any check failed (2 on a usage error).

What it checks:
  - every YAML document parses (PyYAML) and names its apiVersion, kind and metadata.name;
  - built-in kinds (Namespace, Secret, ConfigMap, Service, Deployment, StatefulSet, ...)
    against Kubernetes' own OpenAPI schemas for K8S_VERSION, strictly (unknown fields fail),
    with kubernetes-validate (which ships the schemas: no network);
  - InferencePool, Gateway and HTTPRoute against the schemas in MANIFEST_DIR/schemas
    (jsonschema, Draft 2020-12), plus the CRDs' CEL rules these manifests could break;
  - the references between them: the HTTPRoute's parent Gateway and InferencePool backend,
    the InferencePool's endpoint picker Service and port, its selector against the node pods'
    labels and its target port against llm-warden's provider listener (parsed from the
    node's ConfigMap with tomllib), the node's admin token Secret and probes, the EPP's
    config (its [epp] pool is one of its [[pools]], its listen port is the Service's), and
    the pool's static node list against the StatefulSet's stable DNS names.
"""

from __future__ import annotations

import json
import re
import sys
import os
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import yaml

# The Kubernetes version whose built-in schemas the manifests must satisfy (the oldest these
# manifests aim at; every field they use is older). kubernetes-validate ships 1.25 to 1.37.
K8S_VERSION = "1.33.0"

REPO = Path(__file__).resolve().parents[3]

# (apiVersion, kind) -> schema file in MANIFEST_DIR/schemas.
CRD_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-v1.schema.json",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway-v1.schema.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-v1.schema.json",
}
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, what: str, problem: str | None) -> bool:
        if problem:
            self.failed += 1
            print(f"FAIL: {what}: {problem}")
            return False
        self.passed += 1
        print(f"ok: {what}")
        return True


class Doc:
    def __init__(self, path: Path, index: int, body: dict, root: Path) -> None:
        self.path, self.index, self.body = path, index, body
        self.where = f"{path.relative_to(root)}#{index}"

    @property
    def kind(self) -> str:
        return self.body.get("kind", "")

    @property
    def name(self) -> str:
        return (self.body.get("metadata") or {}).get("name", "")

    @property
    def namespace(self) -> str | None:
        return (self.body.get("metadata") or {}).get("namespace")

    def __str__(self) -> str:
        return f"{self.kind}/{self.name} ({self.where})"


def load(root: Path, report: Report) -> list[Doc]:
    docs: list[Doc] = []
    files = sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    report.check(f"YAML files found under {root}", None if files else "none")
    for path in files:
        try:
            bodies = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as e:
            report.check(f"{path.relative_to(root)} parses", str(e).replace("\n", " "))
            continue
        bodies = [b for b in bodies if b is not None]
        report.check(f"{path.relative_to(root)} parses ({len(bodies)} documents)", None)
        for i, body in enumerate(bodies):
            doc = Doc(path, i, body, root)
            if not isinstance(body, dict):
                report.check(f"{doc.where} is a mapping", f"got {type(body).__name__}")
                continue
            missing = [k for k in ("apiVersion", "kind") if not body.get(k)]
            if not doc.name:
                missing.append("metadata.name")
            if report.check(f"{doc.where} names apiVersion, kind and metadata.name",
                            f"missing {', '.join(missing)}" if missing else None):
                docs.append(doc)
    return docs


def first_error(validator: jsonschema.protocols.Validator, body: dict) -> str | None:
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    e = errors[0]
    where = ".".join(str(p) for p in e.absolute_path) or "(top)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"at {where}: {e.message}{more}"


def validate_schemas(docs: list[Doc], schema_dir: Path, report: Report) -> None:
    validators = {}
    for key, file in CRD_SCHEMAS.items():
        schema = json.loads((schema_dir / file).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        validators[key] = jsonschema.Draft202012Validator(schema)
    for doc in docs:
        key = (doc.body["apiVersion"], doc.kind)
        if key in validators:
            report.check(f"{doc} matches schemas/{CRD_SCHEMAS[key]}",
                         first_error(validators[key], doc.body))
            continue
        if doc.body["apiVersion"].startswith(("inference.networking.", "gateway.networking.")):
            # A version this script has no schema for (e.g. the old v1alpha2 InferencePool).
            report.check(f"{doc} has a schema", f"no schema for {key[0]} {key[1]}")
            continue
        try:
            kubernetes_validate.validate(doc.body, K8S_VERSION, strict=True)
            problem = None
        except kubernetes_validate.SchemaNotFoundError:
            problem = f"no Kubernetes {K8S_VERSION} schema and no CRD schema for {key[0]} {key[1]}"
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.absolute_path) or "(top)"
            problem = f"at {where}: {e.message}"
        report.check(f"{doc} is a valid Kubernetes {K8S_VERSION} {doc.kind} (strict)", problem)


# --- cross-references ------------------------------------------------------------------------


def find(docs: list[Doc], kind: str, name: str, namespace: str | None) -> Doc | None:
    for d in docs:
        if d.kind == kind and d.name == name and d.namespace == namespace:
            return d
    return None


def pod_labels(w: Doc) -> dict:
    return (((w.body.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}


def selects(match_labels: dict, labels: dict) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def containers(w: Doc) -> list[dict]:
    return ((w.body["spec"].get("template") or {}).get("spec") or {}).get("containers") or []


def container_port(c: dict, port) -> int | None:
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    for p in c.get("ports") or []:
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def config_of(docs: list[Doc], w: Doc, c: dict) -> tuple[str, dict | str]:
    """The TOML config a `llm-warden serve --config PATH` container reads, from the ConfigMap
    mounted over PATH: (where, parsed config) or (where, problem)."""
    args = list(c.get("command") or []) + list(c.get("args") or [])
    if "--config" not in args or args.index("--config") + 1 >= len(args):
        return c.get("name", "?"), "its args have no --config PATH"
    path = args[args.index("--config") + 1]
    mounts = [m for m in c.get("volumeMounts") or [] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        return path, "no volume is mounted over it"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    file = m_sub = path[len(mount["mountPath"].rstrip("/")) + 1:]
    if mount.get("subPath"):
        file = mount["subPath"]
        m_sub = None
    volumes = (w.body["spec"]["template"]["spec"].get("volumes") or [])
    vol = next((v for v in volumes if v.get("name") == mount["name"]), None)
    if not vol or "configMap" not in vol:
        return path, f"volume {mount['name']} is not a ConfigMap"
    cm_name = vol["configMap"]["name"]
    cm = find(docs, "ConfigMap", cm_name, w.namespace)
    if cm is None:
        return path, f"ConfigMap {cm_name} is not in the manifests"
    data = cm.body.get("data") or {}
    key = file if m_sub is None else m_sub
    for item in vol["configMap"].get("items") or []:
        if item.get("path") == key:
            key = item["key"]
    if key not in data:
        return path, f"ConfigMap {cm_name} has no key {key}"
    try:
        return f"ConfigMap {cm_name} key {key}", tomllib.loads(data[key])
    except tomllib.TOMLDecodeError as e:
        return f"ConfigMap {cm_name} key {key}", f"TOML: {e}"


def port_of(addr: str) -> int | None:
    m = re.fullmatch(r"(?:\[[^\]]*\]|[^:]*):(\d+)", addr or "")
    return int(m.group(1)) if m else None


def allowed_host(allowed: list[str], host: str) -> bool:
    """llm-warden's admin.allowed_hosts rule (src/hosts.rs, `listed`)."""
    for a in allowed:
        a = a.strip().rstrip(".").lower()
        if a == "*" or a == host or (a.startswith("*.") and host.endswith(a[1:])):
            return True
    return False


def cross_checks(docs: list[Doc], report: Report) -> None:
    # Unique names; one namespace, created by the manifests.
    seen = {}
    for d in docs:
        key = (d.kind, d.namespace, d.name)
        report.check(f"{d} is the only {d.kind} of its name",
                     f"also {seen[key].where}" if key in seen else None)
        seen.setdefault(key, d)
    namespaces = {d.name for d in docs if d.kind == "Namespace"}
    for d in docs:
        if d.kind in CLUSTER_SCOPED:
            continue
        report.check(f"{d} sits in a namespace the manifests create",
                     None if d.namespace in namespaces else
                     f"metadata.namespace {d.namespace!r}, created: {sorted(namespaces)}")

    workloads = [d for d in docs if d.kind in WORKLOADS]
    for w in workloads:
        sel = ((w.body["spec"].get("selector") or {}).get("matchLabels")) or {}
        report.check(f"{w}: selector matches its own pod template",
                     None if selects(sel, pod_labels(w)) else f"{sel} vs {pod_labels(w)}")

    # Gateway and HTTPRoute.
    pools = [d for d in docs if d.kind == "InferencePool"]
    report.check("the manifests hold an InferencePool", None if pools else "none")
    routes = [d for d in docs if d.kind == "HTTPRoute"]
    report.check("the manifests hold an HTTPRoute", None if routes else "none")
    for gw in (d for d in docs if d.kind == "Gateway"):
        names = [l.get("name") for l in gw.body["spec"].get("listeners") or []]
        report.check(f"{gw}: listener names are unique",
                     None if len(names) == len(set(names)) else f"{names}")
    for r in routes:
        for ref in r.body["spec"].get("parentRefs") or []:
            ns = ref.get("namespace", r.namespace)
            ok = ref.get("group", "gateway.networking.k8s.io") == "gateway.networking.k8s.io" \
                and ref.get("kind", "Gateway") == "Gateway" and find(docs, "Gateway", ref["name"], ns)
            report.check(f"{r}: parentRef names Gateway {ref['name']}",
                         None if ok else "no such Gateway in the manifests")
        refs = [b for rule in r.body["spec"].get("rules") or [] for b in rule.get("backendRefs") or []]
        report.check(f"{r} has backendRefs", None if refs else "none")
        for b in refs:
            group, kind = b.get("group", ""), b.get("kind", "Service")
            if group == "" and kind == "Service":
                report.check(f"{r}: backendRef Service {b['name']} has a port",
                             None if "port" in b else "a Service backendRef needs a port (CRD CEL rule)")
                continue
            ok = group == "inference.networking.k8s.io" and kind == "InferencePool" \
                and find(docs, "InferencePool", b["name"], b.get("namespace", r.namespace))
            report.check(f"{r}: backendRef {group}/{kind} {b['name']} is an InferencePool in the manifests",
                         None if ok else "it is not")

    # InferencePool: picker, selector, target port.
    for pool in pools:
        spec = pool.body["spec"]
        numbers = [p["number"] for p in spec.get("targetPorts") or []]
        report.check(f"{pool}: targetPorts are unique (CRD CEL rule)",
                     None if len(numbers) == len(set(numbers)) else f"{numbers}")
        check_picker(docs, pool, report)
        selected = [w for w in workloads if selects(spec["selector"]["matchLabels"], pod_labels(w))]
        report.check(f"{pool}: selector {spec['selector']['matchLabels']} matches node pods",
                     None if selected else "matches no workload's pod template")
        for w in selected:
            check_node(docs, pool, w, numbers, report)


def check_picker(docs: list[Doc], pool: Doc, report: Report) -> None:
    ref = pool.body["spec"].get("endpointPickerRef")
    if not report.check(f"{pool} has an endpointPickerRef", None if ref else "none"):
        return
    kind, group = ref.get("kind", "Service"), ref.get("group", "")
    if not report.check(f"{pool}: endpointPickerRef is a core Service",
                        None if (kind, group) == ("Service", "") else f"{group}/{kind}"):
        return
    if not report.check(f"{pool}: endpointPickerRef has a port (CRD CEL rule)",
                        None if ref.get("port") else "port is required for a Service"):
        return
    svc = find(docs, "Service", ref["name"], pool.namespace)
    if not report.check(f"{pool}: endpointPickerRef names Service {ref['name']}",
                        None if svc else "no such Service in the manifests"):
        return
    want = ref["port"]["number"]
    port = next((p for p in svc.body["spec"].get("ports") or [] if p.get("port") == want), None)
    if not report.check(f"{pool}: Service {svc.name} has port {want}",
                        None if port else f"its ports: {[p.get('port') for p in svc.body['spec'].get('ports') or []]}"):
        return
    report.check(f"{pool}: Service {svc.name} port {want} speaks h2c (gRPC in cleartext)",
                 None if port.get("appProtocol") in ("kubernetes.io/h2c", "http2")
                 else f"appProtocol {port.get('appProtocol')!r}")
    sel = svc.body["spec"].get("selector") or {}
    epps = [w for w in docs if w.kind in WORKLOADS and selects(sel, pod_labels(w))]
    if not report.check(f"Service {svc.name} selects the endpoint picker's pods",
                        None if len(epps) == 1 else f"selects {len(epps)} workloads"):
        return
    epp = epps[0]
    target = port.get("targetPort", port["port"])
    c = next((c for c in containers(epp) if container_port(c, target) is not None), None)
    if not report.check(f"Service {svc.name} targetPort {target!r} is a port of {epp}",
                        None if c else "no container has it"):
        return
    where, cfg = config_of(docs, epp, c)
    if not report.check(f"{epp}: container {c['name']} reads its config ({where})",
                        cfg if isinstance(cfg, str) else None):
        return
    e = cfg.get("epp")
    if not report.check(f"{where} has an [epp] section", None if isinstance(e, dict) else "none"):
        return
    cport = container_port(c, target)
    report.check(f"{where}: [epp] listen {e.get('listen')!r} is on the Service's target port {cport}",
                 None if port_of(e.get("listen", "")) == cport else "it is not")
    report.check(f"{where}: [epp] listen is not loopback (the gateway must reach it)",
                 None if not str(e.get("listen", "")).startswith(("127.", "[::1]", "localhost"))
                 else "loopback")
    pools_cfg = {p.get("name"): p for p in cfg.get("pools") or []}
    if not report.check(f"{where}: [epp] pool {e.get('pool')!r} is one of its [[pools]]",
                        None if e.get("pool") in pools_cfg else f"pools: {sorted(map(str, pools_cfg))}"):
        return
    for probe in ("readinessProbe", "livenessProbe"):
        p = c.get(probe) or {}
        report.check(f"{epp}: {probe} asks gRPC health on the [epp] port",
                     None if (p.get("grpc") or {}).get("port") == cport else f"{p}")
    check_static_nodes(docs, pool, where, pools_cfg[e["pool"]], report)


def check_static_nodes(docs: list[Doc], pool: Doc, where: str, cfg_pool: dict, report: Report) -> None:
    """The EPP's [[pools]] nodes, listed statically, are the pods the InferencePool selects:
    StatefulSet pods by their stable DNS names <sts>-<i>.<headless svc>.<ns>.svc."""
    match = pool.body["spec"]["selector"]["matchLabels"]
    targets = {p["number"] for p in pool.body["spec"]["targetPorts"]}
    nodes = cfg_pool.get("nodes") or []
    report.check(f"{where}: pool {cfg_pool.get('name')!r} lists nodes", None if nodes else "none")
    sets = [w for w in docs if w.kind == "StatefulSet" and selects(match, pod_labels(w))]
    if not report.check(f"{pool} selects a StatefulSet's pods (stable names for the static node list)",
                        None if len(sets) == 1 else f"{len(sets)} StatefulSets"):
        return
    sts = sets[0]
    service = sts.body["spec"].get("serviceName")
    headless = find(docs, "Service", service, sts.namespace)
    report.check(f"{sts}: serviceName {service!r} is a headless Service selecting its pods",
                 None if headless and headless.body["spec"].get("clusterIP") == "None"
                 and selects(headless.body["spec"].get("selector") or {}, pod_labels(sts))
                 else "it is not")
    replicas = sts.body["spec"].get("replicas", 1)
    report.check(f"{where}: {len(nodes)} nodes listed for {sts.name}'s {replicas} replicas",
                 None if len(nodes) == replicas else "the node list and replicas differ")
    name_re = re.compile(rf"{re.escape(sts.name)}-(\d+)\.{re.escape(service or '')}\."
                         rf"{re.escape(sts.namespace or 'default')}\.svc(\.cluster\.local)?")
    admin_cfg = node_config(docs, sts)
    for n in nodes:
        url, admin = urlsplit(n.get("url", "")), urlsplit(n.get("admin", ""))
        m = name_re.fullmatch(url.hostname or "")
        report.check(f"{where}: node url {n.get('url')!r} is a pod of {sts.name}",
                     None if m and int(m.group(1)) < replicas
                     else f"want {sts.name}-<0..{replicas - 1}>.{service}.{sts.namespace}.svc")
        report.check(f"{where}: node url port {url.port} is the InferencePool's target port",
                     None if url.port in targets else f"targetPorts {sorted(targets)}")
        report.check(f"{where}: node admin {n.get('admin')!r} is the same pod",
                     None if admin.hostname == url.hostname else "another host")
        if isinstance(admin_cfg, dict):
            a = admin_cfg.get("admin") or {}
            report.check(f"{where}: node admin port {admin.port} is the node's [admin] listen",
                         None if admin.port == port_of(a.get("listen", "")) else f"{a.get('listen')!r}")
            report.check(f"node [admin] allowed_hosts admits {admin.hostname} (DNS rebinding defence)",
                         None if allowed_host(a.get("allowed_hosts") or [], admin.hostname or "")
                         else f"allowed_hosts {a.get('allowed_hosts')}")


def warden_container(w: Doc) -> dict | None:
    return next((c for c in containers(w) if "serve" in (c.get("args") or []) + (c.get("command") or [])), None)


def node_config(docs: list[Doc], w: Doc) -> dict | str:
    c = warden_container(w)
    return config_of(docs, w, c)[1] if c else "no llm-warden container"


def check_node(docs: list[Doc], pool: Doc, w: Doc, targets: list[int], report: Report) -> None:
    c = warden_container(w)
    if not report.check(f"{w} runs llm-warden (`serve`)", None if c else "no container runs serve"):
        return
    for n in targets:
        report.check(f"{w}: container {c['name']} exposes target port {n}",
                     None if container_port(c, n) == n or any(p.get("containerPort") == n for p in c.get("ports") or [])
                     else "it does not (the pool must reach the node's llm-warden, not the provider)")
    where, cfg = config_of(docs, w, c)
    if not report.check(f"{w}: container {c['name']} reads its config ({where})",
                        cfg if isinstance(cfg, str) else None):
        return
    listens = {port_of(p.get("listen", "")): p for p in cfg.get("providers") or []}
    for n in targets:
        report.check(f"{where}: a [[providers]] entry listens on target port {n}",
                     None if n in listens else f"providers listen on {sorted(map(str, listens))}")
        p = listens.get(n)
        if p is None:
            continue
        report.check(f"{where}: provider {p.get('name')!r} listens on all interfaces",
                     None if str(p.get("listen", "")).startswith(("0.0.0.0:", "[::]:")) else f"{p.get('listen')!r}")
    admin = cfg.get("admin") or {}
    admin_port = port_of(admin.get("listen", ""))
    env = {e["name"]: e for e in c.get("env") or []}
    token = env.get("LLM_WARDEN_ADMIN_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    if report.check(f"{w}: LLM_WARDEN_ADMIN_TOKEN comes from a Secret",
                    None if token else "not set from a secretKeyRef"):
        secret = find(docs, "Secret", token["name"], w.namespace)
        data = (secret.body.get("stringData") or {}) | (secret.body.get("data") or {}) if secret else {}
        report.check(f"{w}: Secret {token['name']} has key {token['key']}",
                     None if token["key"] in data else "missing")
    report.check(f"{where}: no admin token written in the file (it comes from the Secret)",
                 None if not admin.get("token") else "admin.token is set")
    for probe in ("readinessProbe", "livenessProbe"):
        get = (c.get(probe) or {}).get("httpGet") or {}
        report.check(f"{w}: {probe} is GET /healthz on the admin port {admin_port}",
                     None if get.get("path") == "/healthz" and container_port(c, get.get("port")) == admin_port
                     else f"{c.get(probe)}")
    gpus = [x for x in containers(w) if "nvidia.com/gpu" in ((x.get("resources") or {}).get("limits") or {})]
    report.check(f"{w}: the provider container asks for nvidia.com/gpu",
                 None if gpus and c not in gpus else "no other container has an nvidia.com/gpu limit")


def main(argv: list[str]) -> int:
    if len(argv) > 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    root = Path(argv[1]).resolve() if len(argv) == 2 else REPO / "deploy" / "kubernetes"
    report = Report()
    docs = load(root, report)
    validate_schemas(docs, root / "schemas", report)
    cross_checks(docs, report)
    # For the Rust test: every llm-warden config embedded in a ConfigMap, written out so that
    # the proxy's own loader can check it (WARDEN_DUMP_CONFIGS=<dir>).
    dump = os.environ.get("WARDEN_DUMP_CONFIGS")
    if dump:
        for d in docs:
            if d.kind != "ConfigMap":
                continue
            for key, text in (d.body.get("data") or {}).items():
                if key.endswith(".toml"):
                    Path(dump, f"{d.name}--{key}").write_text(text)
    print(f"{report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
