# kubectl (stand-in): the command shapes klab's phases use, with real kubectl's output formats,
# against the stand-in API server named by --kubeconfig (default /etc/kubernetes/admin.conf) or
# --server. Anything else fails: `kubectl (stand-in): unsupported: …`, exit 1 — never a silent 0.
#
#   version [--client]                     get --raw PATH
#   get nodes|node NAME… [-o wide|json|yaml|name|jsonpath=…] [--no-headers]
#   get daemonset|deployment [NAME…] (-n NS) [-o …]
#   apply [--server-side] [--force-conflicts] (-k DIR | -f FILE)    (kustomize: resources, patches
#                                          as strategic merge patches, namespace)
#   wait --for=condition=Ready node (--all | NAME…) [--timeout=D]
#   rollout status deployment/NAME|daemonset/NAME [--timeout=D]
#   drain NODE [--ignore-daemonsets] [--delete-emptydir-data] [--force] [--timeout=D]
#   cordon NODE, uncordon NODE, delete node NAME… [--ignore-not-found]

import copy

PROG = "kubectl"
KUSTOMIZE_VERSION = "v5.7.1"

VALUE_FLAGS = {"--kubeconfig", "--server", "--namespace", "--output", "--raw", "--kustomize", "--filename",
               "--timeout", "--for", "--field-manager", "--request-timeout", "--grace-period", "--context"}
BOOL_FLAGS = {"--all", "--no-headers", "--server-side", "--force-conflicts", "--ignore-daemonsets",
              "--delete-emptydir-data", "--force", "--ignore-not-found", "--client", "--all-namespaces",
              "--insecure-skip-tls-verify", "--disable-eviction"}
SHORT = {"-s": "--server", "-n": "--namespace", "-o": "--output", "-k": "--kustomize", "-f": "--filename",
         "-A": "--all-namespaces"}
RESOURCES = {}
for _names, _kind, _group, _plural in (
        (("node", "nodes", "no"), "Node", "", "nodes"),
        (("daemonset", "daemonsets", "ds", "daemonset.apps", "daemonsets.apps"), "DaemonSet", "apps", "daemonsets"),
        (("deployment", "deployments", "deploy", "deployment.apps", "deployments.apps"), "Deployment", "apps",
         "deployments")):
    for _n in _names:
        RESOURCES[_n] = (_kind, _group, _plural)

ARGS = []


def unsupported(what=None):
    die("kubectl (stand-in): unsupported: %s" % (what or " ".join(ARGS)))


def parse(args):
    opts, pos = {}, []
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            pos.extend(args[i:])
            break
        if not a.startswith("-") or a == "-":
            pos.append(a)
            continue
        name, value = a, None
        if a.startswith("--") and "=" in a:
            name, value = a.split("=", 1)
        elif not a.startswith("--"):
            short = a[:2]
            if short not in SHORT:
                unsupported("flag %s" % a)
            name = SHORT[short]
            if len(a) > 2:
                value = a[2:].lstrip("=")
        if name in BOOL_FLAGS:
            opts[name] = value is None or value.lower() == "true"
        elif name in VALUE_FLAGS:
            if value is None:
                if i >= len(args):
                    die("error: flag needs an argument: %s" % a)
                value = args[i]
                i += 1
            opts[name] = value
        else:
            unsupported("flag %s" % a)
    return opts, pos


# --- the connection ---------------------------------------------------------------------------

class Client:
    def __init__(self, opts):
        self.token = None
        server = None
        explicit = opts.get("--kubeconfig")
        path = rooted(explicit or ADMIN_CONF)
        if os.path.isfile(path):
            server, self.token = kubeconfig_server(path)
        elif explicit:
            die("error: stat %s: no such file or directory" % explicit)
        if opts.get("--server"):
            server = opts["--server"]
        if not server and not os.environ.get("KLAB_STANDIN_SERVER"):
            die("The connection to the server localhost:8080 was refused - did you specify the right host or port?")
        self.server = server_url(server)
        self.timeout = 10

    def call(self, method, path, body=None, raw=False):
        try:
            return api(self.server, method, path, body, token=self.token, timeout=self.timeout, raw=raw)
        except Unreachable as e:
            if e.refused:
                die("The connection to the server %s was refused - did you specify the right host or port?"
                    % e.hostport)
            die("Unable to connect to the server: %s" % e.detail)


def from_server(e):
    return "Error from server (%s): %s" % (e.reason or "InternalError", e.message)


# --- jsonpath (the subset kubectl templates use) -------------------------------------------------

class JsonPathError(Exception):
    pass


def _close(s, i, open_c, close_c):
    """Index of the `close_c` matching s[i] == open_c, skipping quoted strings."""
    depth, q = 0, None
    while i < len(s):
        c = s[i]
        if q:
            if c == "\\":
                i += 1
            elif c == q:
                q = None
        elif c in "\"'":
            q = c
        elif c == open_c:
            depth += 1
        elif c == close_c:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise JsonPathError("unclosed %s" % open_c)


def _literal(s):
    if s.startswith('"'):
        return json.loads(s)
    return s[1:-1].replace("\\'", "'")


def parse_path(s):
    segs, i = [], 0
    if s[:1] in ("$", "@"):
        i = 1
    while i < len(s):
        c = s[i]
        if c == ".":
            if s[i + 1:i + 2] == ".":
                raise JsonPathError("recursive descent (..) is not supported by the stand-in")
            i += 1
            name = ""
            while i < len(s) and s[i] not in ".[":
                if s[i] == "\\" and i + 1 < len(s):
                    name += s[i + 1]
                    i += 2
                    continue
                name += s[i]
                i += 1
            if name == "*":
                segs.append(("wild",))
            elif name:
                segs.append(("field", name))
        elif c == "[":
            j = _close(s, i, "[", "]")
            inner = s[i + 1:j].strip()
            i = j + 1
            if inner == "*":
                segs.append(("wild",))
            elif inner.startswith("?(") and inner.endswith(")"):
                segs.append(("filter",) + parse_filter(inner[2:-1].strip()))
            elif inner[:1] in "\"'":
                segs.append(("field", _literal(inner)))
            elif re.fullmatch(r"-?\d+", inner):
                segs.append(("index", int(inner)))
            elif re.fullmatch(r"-?\d*:-?\d*", inner):
                a, b = inner.split(":")
                segs.append(("slice", int(a) if a else None, int(b) if b else None))
            else:
                raise JsonPathError("unsupported subscript [%s]" % inner)
        else:
            raise JsonPathError("unexpected %r in %s" % (c, s))
    return segs


def parse_filter(expr):
    q = None
    for i, c in enumerate(expr):
        if q:
            if c == q:
                q = None
            continue
        if c in "\"'":
            q = c
            continue
        for op in ("==", "!=", "<=", ">=", "<", ">"):
            if expr.startswith(op, i):
                left, right = expr[:i].strip(), expr[i + len(op):].strip()
                if right[:1] in "\"'":
                    rv = ("lit", _literal(right))
                elif re.fullmatch(r"-?\d+(\.\d+)?", right):
                    rv = ("lit", float(right))
                else:
                    rv = ("path", parse_path(right))
                return (parse_path(left), op, rv)
    return (parse_path(expr), None, None)


def walk(vals, segs):
    for seg in segs:
        out = []
        for v in vals:
            kind = seg[0]
            if kind == "field":
                if isinstance(v, dict) and seg[1] in v:
                    out.append(v[seg[1]])
            elif kind == "wild":
                if isinstance(v, list):
                    out.extend(v)
                elif isinstance(v, dict):
                    out.extend(v.values())
            elif kind == "index":
                if isinstance(v, list) and -len(v) <= seg[1] < len(v):
                    out.append(v[seg[1]])
            elif kind == "slice":
                if isinstance(v, list):
                    out.extend(v[seg[1]:seg[2]])
            elif kind == "filter":
                if isinstance(v, list):
                    out.extend(e for e in v if test(e, seg[1], seg[2], seg[3]))
        vals = out
    return vals


def test(elem, left, op, right):
    lv = walk([elem], left)
    if op is None:
        return bool(lv)
    if not lv:
        return False
    a = lv[0]
    b = right[1] if right[0] == "lit" else (walk([elem], right[1]) or [None])[0]
    if isinstance(b, float) and isinstance(a, (int, float)) and not isinstance(a, bool):
        a = float(a)
    elif isinstance(b, float):
        return False
    try:
        return {"==": a == b, "!=": a != b, "<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]
    except TypeError:
        return False


def parse_template(t):
    root, stack, i = [], [], 0
    cur = root
    text = ""
    while i < len(t):
        c = t[i]
        if c != "{":
            text += c
            i += 1
            continue
        if text:
            cur.append(("text", text))
            text = ""
        j = _close(t, i, "{", "}")
        action = t[i + 1:j].strip()
        i = j + 1
        if action.startswith("range "):
            node = ("range", parse_path(action[6:].strip()), [])
            cur.append(node)
            stack.append(cur)
            cur = node[2]
        elif action == "end":
            if not stack:
                raise JsonPathError("{end} without {range}")
            cur = stack.pop()
        elif action[:1] in "\"'":
            cur.append(("text", _literal(action)))
        else:
            cur.append(("path", parse_path(action)))
    if text:
        cur.append(("text", text))
    if stack:
        raise JsonPathError("{range} without {end}")
    return root


def fmt(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    if v is None:
        return "null"
    return str(v)


def execute(nodes, cur, out):
    for n in nodes:
        if n[0] == "text":
            out.append(n[1])
        elif n[0] == "path":
            out.append(" ".join(fmt(v) for v in walk([cur], n[1])))
        else:
            vals = walk([cur], n[1])
            if len(vals) == 1 and isinstance(vals[0], list) and (not n[1] or n[1][-1][0] != "wild"):
                vals = vals[0]
            for v in vals:
                execute(n[2], v, out)


def jsonpath(template, obj):
    t = template.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        t = t[1:-1]
    try:
        nodes = parse_template(t)
    except (JsonPathError, ValueError) as e:
        die("error: error parsing jsonpath %s, %s" % (template, e))
    out = []
    execute(nodes, obj, out)
    return "".join(out)


# --- tables --------------------------------------------------------------------------------------

def human_duration(d):
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    s = int(d)
    if s < 0:
        return "0s"
    if s < 120:
        return "%ds" % s
    m = s // 60
    if m < 10:
        return "%dm%ds" % (m, s % 60) if s % 60 else "%dm" % m
    if m < 180:
        return "%dm" % m
    h = s // 3600
    if h < 8:
        return "%dh%dm" % (h, m % 60) if m % 60 else "%dh" % h
    if h < 48:
        return "%dh" % h
    if h < 192:
        return "%dd%dh" % (h // 24, h % 24) if h % 24 else "%dd" % (h // 24)
    if h < 24 * 365 * 2:
        return "%dd" % (h // 24)
    return "%dy" % (h // 24 // 365)


def age(obj):
    ts = (obj.get("metadata") or {}).get("creationTimestamp")
    if not ts:
        return "<unknown>"
    t = time.mktime(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    return human_duration(time.time() - t)


def table(header, rows, no_headers):
    """kubectl's tabwriter: columns padded to the widest cell + 3 (at least 6), last one ragged."""
    lines = rows if no_headers else [header] + rows
    if not lines:
        return ""
    widths = [max(6, max(len(r[c]) for r in lines) + 3) for c in range(len(header))]
    out = []
    for r in lines:
        out.append("".join(r[c].ljust(widths[c]) if c < len(r) - 1 else r[c] for c in range(len(r))).rstrip() + "\n")
    return "".join(out)


def node_row(n, wide):
    cond = next((c for c in n["status"].get("conditions", []) if c["type"] == "Ready"), {})
    st = {"True": "Ready", "False": "NotReady"}.get(cond.get("status"), "Unknown")
    if (n.get("spec") or {}).get("unschedulable"):
        st += ",SchedulingDisabled"
    roles = sorted(k.split("/", 1)[1] for k in (n["metadata"].get("labels") or {})
                   if k.startswith("node-role.kubernetes.io/"))
    info = n["status"].get("nodeInfo") or {}
    row = [n["metadata"]["name"], st, ",".join(roles) or "<none>", age(n), info.get("kubeletVersion", "")]
    if wide:
        addrs = {a["type"]: a["address"] for a in n["status"].get("addresses", [])}
        row += [addrs.get("InternalIP", "<none>"), addrs.get("ExternalIP", "<none>"), info.get("osImage", ""),
                info.get("kernelVersion", ""), info.get("containerRuntimeVersion", "")]
    return row


def object_row(kind, o, wide):
    s = o.get("status") or {}
    name = o["metadata"]["name"]
    if kind == "Deployment":
        want = (o.get("spec") or {}).get("replicas", 1)
        return [name, "%d/%d" % (s.get("readyReplicas", 0), want), str(s.get("updatedReplicas", 0)),
                str(s.get("availableReplicas", 0)), age(o)]
    sel = ((o.get("spec") or {}).get("template") or {}).get("spec", {}).get("nodeSelector") or {}
    return [name, str(s.get("desiredNumberScheduled", 0)), str(s.get("currentNumberScheduled", 0)),
            str(s.get("numberReady", 0)), str(s.get("updatedNumberScheduled", 0)), str(s.get("numberAvailable", 0)),
            ",".join("%s=%s" % kv for kv in sorted(sel.items())) or "<none>", age(o)]


HEADERS = {
    "Node": ["NAME", "STATUS", "ROLES", "AGE", "VERSION"],
    "Node-wide": ["NAME", "STATUS", "ROLES", "AGE", "VERSION", "INTERNAL-IP", "EXTERNAL-IP", "OS-IMAGE",
                  "KERNEL-VERSION", "CONTAINER-RUNTIME"],
    "Deployment": ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
    "DaemonSet": ["NAME", "DESIRED", "CURRENT", "READY", "UP-TO-DATE", "AVAILABLE", "NODE SELECTOR", "AGE"],
}


def print_objects(kind, plural, group, objs, single, opts):
    output = opts.get("--output", "")
    if output.startswith("jsonpath="):
        root = objs[0] if single else {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
                                       "items": objs}
        sys.stdout.write(jsonpath(output[len("jsonpath="):], root))
    elif output in ("json", "yaml"):
        root = objs[0] if single else {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
                                       "items": objs}
        sys.stdout.write(json.dumps(root, indent=4) + "\n" if output == "json" else yaml_dump(root))
    elif output == "name":
        for o in objs:
            print("%s%s/%s" % (kind.lower(), "." + group if group else "", o["metadata"]["name"]))
    elif output in ("", "wide"):
        if not objs:
            return
        wide = output == "wide"
        if kind == "Node":
            rows = [node_row(o, wide) for o in objs]
            header = HEADERS["Node-wide" if wide else "Node"]
        else:
            rows = [object_row(kind, o, wide) for o in objs]
            header = HEADERS[kind]
        sys.stdout.write(table(header, rows, opts.get("--no-headers", False)))
    else:
        unsupported("output format %s" % output)


# --- commands ------------------------------------------------------------------------------------

def resource_args(pos):
    """[(resource, name or None)] from `node a b`, `node/a`, `nodes`."""
    if not pos:
        die("error: You must specify the type of resource to get.")
    out = []
    if "/" in pos[0]:
        for p in pos:
            if "/" not in p:
                die("error: there is no need to specify a resource type as a separate argument when passing "
                    "arguments in resource/name form")
            r, n = p.split("/", 1)
            out.append((r, n))
        return out
    r = pos[0]
    return [(r, n) for n in pos[1:]] or [(r, None)]


def lookup(resource):
    if resource not in RESOURCES:
        unsupported("resource %s" % resource)
    return RESOURCES[resource]


def fetch(client, kind, plural, group, ns, name):
    """One object, or None when the server says NotFound."""
    path = "/klab/v1/nodes/%s" % name if kind == "Node" else "/klab/v1/objects/%s/%s/%s" % (kind, ns, name)
    try:
        return client.call("GET", path)
    except ApiError as e:
        if e.status == 404:
            return None
        die(from_server(e))


def not_found(plural, group, name):
    return 'Error from server (NotFound): %s%s "%s" not found' % (plural, "." + group if group else "", name)


def cmd_get(opts, pos):
    client = Client(opts)
    if "--raw" in opts:
        if pos:
            die("error: arguments may not be passed when --raw is specified")
        try:
            body = api(client.server, "GET", opts["--raw"], token=client.token, raw=True)
        except ApiError as e:
            die(from_server(e))
        except Unreachable:
            client.call("GET", opts["--raw"], raw=True)  # prints kubectl's connection error
            return 1
        sys.stdout.write(body if body.endswith("\n") else body + "\n")
        return 0
    targets = resource_args(pos)
    ns = opts.get("--namespace", "default")
    kinds = {lookup(r) for r, _ in targets}
    if len(kinds) != 1:
        unsupported("get of several resource types")
    kind, group, plural = kinds.pop()
    names = [n for _, n in targets if n]
    rc = 0
    if not names:
        if kind == "Node":
            objs = client.call("GET", "/klab/v1/nodes")["items"]
        else:
            if opts.get("--all-namespaces"):
                unsupported("--all-namespaces")
            try:
                objs = client.call("GET", "/klab/v1/objects/%s/%s" % (kind, ns))["items"]
            except ApiError as e:
                die(from_server(e))
        if not objs and opts.get("--output", "") in ("", "wide"):
            sys.stderr.write("No resources found%s\n" % ("" if kind == "Node" else " in %s namespace." % ns))
            return 0
        print_objects(kind, plural, group, objs, False, opts)
        return 0
    objs = []
    for n in names:
        o = fetch(client, kind, plural, group, ns, n)
        if o is None:
            sys.stderr.write(not_found(plural, group, n) + "\n")
            rc = 1
        else:
            objs.append(o)
    if objs:
        print_objects(kind, plural, group, objs, len(names) == 1, opts)
    return rc


def load_docs(path):
    try:
        with (sys.stdin if path == "-" else open(path)) as f:
            docs = yaml_load_all(f.read())
    except OSError as e:
        die("error: the path \"%s\" does not exist" % path if e.errno == 2 else "error: %s: %s" % (path, e))
    except Exception as e:  # yaml.YAMLError
        die("error: error parsing %s: %s" % (path, e))
    out = []
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == "List" and "items" in d:
            out.extend(d["items"] or [])
        elif isinstance(d, dict):
            out.append(d)
        else:
            die("error: %s: a document is not an object" % path)
    return out


# Strategic merge: the merge keys of the list fields kustomize merges by key (everything else is
# replaced), from k8s.io/api's patchMergeKey tags.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
              "volumes": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath",
              "ports": "containerPort", "imagePullSecrets": "name", "hostAliases": "ip"}


def smp(orig, patch):
    if not isinstance(orig, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    out = copy.deepcopy(orig)
    for k, pv in patch.items():
        if k.startswith("$"):
            continue
        if pv is None:
            out.pop(k, None)
        elif k in out and isinstance(out[k], dict) and isinstance(pv, dict):
            out[k] = smp(out[k], pv)
        elif k in out and isinstance(out[k], list) and isinstance(pv, list) and k in MERGE_KEYS:
            out[k] = merge_list(out[k], pv, MERGE_KEYS[k])
        else:
            out[k] = smp({}, pv) if isinstance(pv, dict) else copy.deepcopy(pv)
    return out


def merge_list(orig, patch, key):
    out = copy.deepcopy(orig)
    for pe in patch:
        idx = None
        if isinstance(pe, dict) and key in pe:
            idx = next((i for i, e in enumerate(out) if isinstance(e, dict) and e.get(key) == pe[key]), None)
        if isinstance(pe, dict) and pe.get("$patch") == "delete":
            if idx is not None:
                del out[idx]
            continue
        if idx is None:
            out.append(smp({}, pe) if isinstance(pe, dict) else copy.deepcopy(pe))
        else:
            out[idx] = smp(out[idx], pe)
    return out


def obj_id(o):
    api_version = o.get("apiVersion", "")
    group, version = api_version.split("/", 1) if "/" in api_version else ("", api_version)
    meta = o.get("metadata") or {}
    return "%s.%s.%s/%s.%s" % (o.get("kind"), version, group, meta.get("name"), meta.get("namespace", "[noNs]"))


def kustomize(d):
    """kustomize build of the kustomizations klab renders: resources, patches (strategic merge
    patches by path or inline), patchesStrategicMerge, namespace."""
    d = rooted_input(d)
    kfile = next((os.path.join(d, n) for n in ("kustomization.yaml", "kustomization.yml", "Kustomization")
                  if os.path.isfile(os.path.join(d, n))), None)
    if kfile is None:
        die("error: unable to find one of 'kustomization.yaml', 'kustomization.yml' or 'Kustomization' in "
            "directory '%s'" % d)
    docs = load_docs(kfile)
    k = docs[0] if docs else {}
    allowed = {"apiVersion", "kind", "metadata", "resources", "patches", "patchesStrategicMerge", "namespace"}
    extra = sorted(set(k) - allowed)
    if extra:
        unsupported("kustomization field(s) %s in %s" % (", ".join(extra), kfile))
    objs = []
    for r in k.get("resources") or []:
        p = os.path.join(d, r)
        objs.extend(kustomize(p) if os.path.isdir(p) else load_docs(p))
    patches = []
    for p in k.get("patches") or []:
        if not isinstance(p, dict) or "target" in p or "options" in p:
            unsupported("kustomization patch %s (only `path:`/`patch:` strategic merge patches)" % json.dumps(p))
        if "path" in p:
            patches.extend(load_docs(os.path.join(d, p["path"])))
        elif "patch" in p:
            patches.extend(x for x in yaml_load_all(p["patch"]) if isinstance(x, dict))
    for p in k.get("patchesStrategicMerge") or []:
        patches.extend(load_docs(os.path.join(d, p)))
    for patch in patches:
        if isinstance(patch, list) or "op" in patch:
            unsupported("JSON 6902 patches")
        pm = patch.get("metadata") or {}
        hits = [i for i, o in enumerate(objs)
                if o.get("kind") == patch.get("kind") and (o.get("metadata") or {}).get("name") == pm.get("name")
                and (not pm.get("namespace") or (o.get("metadata") or {}).get("namespace", pm["namespace"])
                     == pm["namespace"])]
        if len(hits) != 1:
            pid = obj_id(patch)
            die('error: no resource matches strategic merge patch "%s": no matches for Id %s; failed to find '
                'unique target for patch %s' % (pid, pid, pid))
        objs[hits[0]] = smp(objs[hits[0]], patch)
    if k.get("namespace"):
        for o in objs:
            o.setdefault("metadata", {})["namespace"] = k["namespace"]
    return objs


def cmd_apply(opts, pos):
    if pos:
        unsupported()
    if "--kustomize" in opts and "--filename" in opts:
        die("error: only one of -f or -k can be specified")
    if "--kustomize" in opts:
        objs = kustomize(opts["--kustomize"])
    elif "--filename" in opts:
        objs = load_docs(opts["--filename"] if opts["--filename"] == "-" else rooted_input(opts["--filename"]))
    else:
        die("error: must specify one of -f and -k")
    if opts.get("--output"):
        unsupported("apply -o")
    client = Client(opts)
    try:
        res = client.call("POST", "/klab/v1/apply", {"objects": objs, "namespace": opts.get("--namespace"),
                                                     "serverSide": bool(opts.get("--server-side"))})
    except ApiError as e:
        die(from_server(e))
    for r in res["results"]:
        ref = "%s%s/%s" % (r["kind"].lower(), "." + r["group"] if r["group"] else "", r["name"])
        verb = "serverside-applied" if opts.get("--server-side") else ("configured" if r["existed"] else "created")
        print("%s %s" % (ref, verb))
    return 0


def timeout_of(opts, default):
    t = opts.get("--timeout")
    if t is None:
        return default
    if re.fullmatch(r"\d+", t):
        t += "s"
    d = parse_duration(t)
    if d is None:
        die('error: invalid argument "%s" for "--timeout" flag: time: invalid duration "%s"' % (t, t))
    return d


def cmd_wait(opts, pos):
    cond = opts.get("--for", "")
    m = re.fullmatch(r"condition=([A-Za-z]+)(?:=(\w+))?", cond)
    if not m:
        unsupported("wait --for=%s" % cond)
    ctype, want = m.group(1), (m.group(2) or "True")
    targets = resource_args(pos)
    if {lookup(r)[0] for r, _ in targets} != {"Node"}:
        unsupported("wait on %s" % ", ".join(r for r, _ in targets))
    client = Client(opts)
    deadline = time.time() + timeout_of(opts, 30.0)
    names = [n for _, n in targets if n]
    if opts.get("--all"):
        if names:
            die("error: name cannot be provided when --all is specified")
        names = [n["metadata"]["name"] for n in client.call("GET", "/klab/v1/nodes")["items"]]
        if not names:
            die("error: no matching resources found")
    elif not names:
        die("error: resource(s) were provided, but no name was specified")
    for name in names:
        while True:
            n = fetch(client, "Node", "nodes", "", "", name)
            if n is None:
                die(not_found("nodes", "", name))
            c = next((c for c in n["status"].get("conditions", []) if c["type"].lower() == ctype.lower()), None)
            if c is not None and c["status"].lower() == want.lower():
                print("node/%s condition met" % name)
                break
            if time.time() >= deadline:
                die("error: timed out waiting for the condition on nodes/%s" % name)
            time.sleep(min(1.0, max(0.05, deadline - time.time())))
    return 0


def cmd_rollout(opts, pos):
    if pos[:1] != ["status"] or len(pos) < 2:
        unsupported()
    targets = resource_args(pos[1:])
    if len(targets) != 1 or not targets[0][1]:
        unsupported()
    kind, group, plural = lookup(targets[0][0])
    if kind == "Node":
        die('error: no rollout status for nodes')
    name = targets[0][1]
    ns = opts.get("--namespace", "default")
    client = Client(opts)
    t = timeout_of(opts, 0.0)
    deadline = time.time() + t if t > 0 else None
    last = None
    while True:
        o = fetch(client, kind, plural, group, ns, name)
        if o is None:
            die(not_found(plural, group, name))
        s = o.get("status") or {}
        if kind == "Deployment":
            want = (o.get("spec") or {}).get("replicas", 1)
            if s.get("updatedReplicas", 0) >= want and s.get("availableReplicas", 0) >= want:
                print('deployment "%s" successfully rolled out' % name)
                return 0
            msg = 'Waiting for deployment "%s" rollout to finish: %d of %d updated replicas are available...' % (
                name, s.get("availableReplicas", 0), want)
        else:
            want = s.get("desiredNumberScheduled", 0)
            if s.get("numberAvailable", 0) >= want:
                print('daemon set "%s" successfully rolled out' % name)
                return 0
            msg = 'Waiting for daemon set "%s" rollout to finish: %d of %d updated pods are available...' % (
                name, s.get("numberAvailable", 0), want)
        if msg != last:
            print(msg)
            sys.stdout.flush()
            last = msg
        if deadline is not None and time.time() >= deadline:
            die("error: timed out waiting for the condition")
        time.sleep(1.0)


def daemon_pods(client, node):
    """kube-system/<daemonset>-xxxxx for each DaemonSet (one pod per node)."""
    import hashlib
    out = []
    for ds in ("calico-node", "kube-proxy"):
        if fetch(client, "DaemonSet", "daemonsets", "apps", "kube-system", ds) is not None:
            h = hashlib.sha256(("%s/%s" % (ds, node)).encode()).hexdigest()
            suffix = "".join("bcdfghjklmnpqrstvwxz2456789"[int(h[i:i + 2], 16) % 27] for i in range(0, 10, 2))
            out.append("kube-system/%s-%s" % (ds, suffix))
    return out


def cordon(client, name, on):
    try:
        res = client.call("POST", "/klab/v1/nodes/%s/%s" % (name, "cordon" if on else "uncordon"))
    except ApiError as e:
        die(from_server(e) if e.status != 404 else not_found("nodes", "", name))
    word = "cordoned" if on else "uncordoned"
    print("node/%s %s%s" % (name, "" if res["changed"] else "already ", word))


def cmd_cordon(opts, pos, on):
    if len(pos) != 1:
        unsupported()
    cordon(Client(opts), pos[0], on)
    return 0


def cmd_drain(opts, pos):
    if len(pos) != 1:
        unsupported()
    name = pos[0]
    client = Client(opts)
    if fetch(client, "Node", "nodes", "", "", name) is None:
        die(not_found("nodes", "", name))
    cordon(client, name, True)
    pods = daemon_pods(client, name)
    if pods and not opts.get("--ignore-daemonsets"):
        die('error: unable to drain node "%s" due to error: cannot delete DaemonSet-managed Pods (use '
            '--ignore-daemonsets to ignore): %s, continuing command...\nThere are pending nodes to be drained:\n'
            ' %s\ncannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore): %s'
            % (name, ", ".join(pods), name, ", ".join(pods)))
    if pods:
        sys.stderr.write("Warning: ignoring DaemonSet-managed Pods: %s\n" % ", ".join(pods))
    try:
        client.call("POST", "/klab/v1/nodes/%s/drain" % name)
    except ApiError as e:
        die(from_server(e))
    print("node/%s drained" % name)
    return 0


def cmd_delete(opts, pos):
    targets = resource_args(pos)
    if {lookup(r)[0] for r, _ in targets} != {"Node"} or not all(n for _, n in targets):
        unsupported()
    client = Client(opts)
    rc = 0
    for _, name in targets:
        try:
            client.call("DELETE", "/klab/v1/nodes/%s" % name)
            print('node "%s" deleted' % name)
        except ApiError as e:
            if e.status == 404 and opts.get("--ignore-not-found"):
                continue
            sys.stderr.write((not_found("nodes", "", name) if e.status == 404 else from_server(e)) + "\n")
            rc = 1
    return rc


def cmd_version(opts, pos):
    if pos[1:]:
        unsupported()
    print("Client Version: %s" % VERSION)
    print("Kustomize Version: %s" % KUSTOMIZE_VERSION)
    if opts.get("--client"):
        return 0
    client = Client(opts)
    try:
        v = client.call("GET", "/version")
    except ApiError as e:
        die(from_server(e))
    print("Server Version: %s" % v.get("gitVersion"))
    return 0


def main():
    try:
        return dispatch()
    except ApiError as e:
        die(from_server(e))


def dispatch():
    global ARGS
    ARGS = sys.argv[1:]
    record("kubectl", ARGS)
    if any(a == "--version" or a.startswith("--version=") for a in ARGS):
        print("Client Version: %s" % VERSION)
        return 0
    opts, pos = parse(ARGS)
    if not pos:
        unsupported()
    verb, rest = pos[0], pos[1:]
    if verb == "version":
        return cmd_version(opts, pos)
    if verb == "get":
        return cmd_get(opts, rest)
    if verb == "apply":
        return cmd_apply(opts, rest)
    if verb == "wait":
        return cmd_wait(opts, rest)
    if verb == "rollout":
        return cmd_rollout(opts, rest)
    if verb == "drain":
        return cmd_drain(opts, rest)
    if verb in ("cordon", "uncordon"):
        return cmd_cordon(opts, rest, verb == "cordon")
    if verb == "delete":
        return cmd_delete(opts, rest)
    unsupported()


sys.exit(main())
