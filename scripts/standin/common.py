# klab STAND-IN: not Kubernetes. Records its calls for klab's end-to-end test.
#
# Shared prologue of the python stand-ins (scripts/standin-repo.sh puts it in front of each
# program, after the shebang, with @VERSION@ filled in). Everything moves under
# $KLAB_STANDIN_ROOT when it is set (tests on a host); calls are recorded as the shell stand-ins
# did: one line per call in $R/var/log/klab-standin/calls.log and <prog>.log.
#
# Test-only environment (never set on a real node):
#   KLAB_STANDIN_ROOT     prefix for every path (/etc/kubernetes, /var/lib/kubelet, state, logs)
#   KLAB_STANDIN_SERVER   https://HOST:PORT every client talks to, whatever its kubeconfig or
#                         discovery endpoint says (so a host test reaches its 127.0.0.1 server)
#   KLAB_STANDIN_PORT     the port the API server listens on (default: bindPort, 6443)
#   KLAB_STANDIN_BIND     the address it binds (default 0.0.0.0; 127.0.0.1 under KLAB_STANDIN_ROOT)

import json
import os
import re
import subprocess
import sys
import time

VERSION = "v@VERSION@"
R = os.environ.get("KLAB_STANDIN_ROOT", "")
LOG = R + "/var/log/klab-standin"
STATE = R + "/var/lib/klab-standin"
K = R + "/etc/kubernetes"
PKI = K + "/pki"
KUBELET_DIR = R + "/var/lib/kubelet"
ADMIN_CONF = "/etc/kubernetes/admin.conf"
KUBELET_CONF = "/etc/kubernetes/kubelet.conf"
FLAGS_ENV = KUBELET_DIR + "/kubeadm-flags.env"
CLUSTER_STATE = STATE + "/cluster.json"
OBJECTS_STATE = STATE + "/objects.json"
SERVER_CONF = STATE + "/apiserver.json"
SERVER_PID = STATE + "/apiserver.pid"
TOKENS = STATE + "/tokens"
UNIT = "klab-standin-apiserver.service"
DEFAULT_PORT = 6443


def _shq(a):
    return "'" + a.replace("'", "'\\''") + "'"


def record(prog, args):
    os.makedirs(LOG, exist_ok=True)
    os.makedirs(STATE, exist_ok=True)
    line = " ".join([prog] + [_shq(a) for a in args]) + "\n"
    for name in ("calls.log", prog + ".log"):
        with open(os.path.join(LOG, name), "a") as f:
            f.write(line)


def rooted(path):
    """`path` under $KLAB_STANDIN_ROOT (absolute paths only, and not twice)."""
    if R and path.startswith("/") and not (path == R or path.startswith(R.rstrip("/") + "/")):
        return R + path
    return path


def rooted_input(path):
    """A file given on the command line: the one under $KLAB_STANDIN_ROOT when it is there (so a
    test runs klab's commands verbatim), else `path` as given."""
    r = rooted(path)
    return r if r != path and os.path.exists(r) else path


def under_systemd():
    """The real node: systemd runs the services and no test root moves the paths."""
    return R == "" and os.path.isdir("/run/systemd/system")


def die(msg, code=1):
    sys.stderr.write(msg.rstrip("\n") + "\n")
    sys.exit(code)


def write_atomic(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = "%s.tmp.%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_json(path, obj, mode=0o644):
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n", mode)


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def yaml_module():
    import yaml
    return yaml


def yaml_load_all(text):
    yaml = yaml_module()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all(text, Loader=loader) if d is not None]


def yaml_dump(obj):
    yaml = yaml_module()
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(obj, Dumper=dumper, default_flow_style=False, sort_keys=False)


def iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parse_duration(s):
    """A Go duration (`120s`, `2m`, `1m30s`, `0`) in seconds; None when malformed."""
    s = s.strip()
    if s == "0":
        return 0.0
    units = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|\u00b5s|ms|s|m|h)", s)
    if not parts or "".join(n + u for n, u in parts) != s:
        return None
    return sum(float(n) * units[u] for n, u in parts)


# --- the API client: HTTPS to the stand-in API server --------------------------------------------


class ApiError(Exception):
    """The server answered with an error status (`status`, the Status `reason` and `message`)."""

    def __init__(self, status, reason, message):
        Exception.__init__(self, message)
        self.status = status
        self.reason = reason
        self.message = message


class Unreachable(Exception):
    def __init__(self, hostport, refused, detail):
        Exception.__init__(self, detail)
        self.hostport = hostport
        self.refused = refused
        self.detail = detail


def normalize(url):
    """`https://HOST:PORT` for a kubeconfig `server:` or a `HOST:PORT` endpoint."""
    if url and "://" not in url:
        url = "https://" + url
    return (url or "").rstrip("/")


def server_url(url):
    """The cluster's API server for a kubeconfig `server:` or a discovery endpoint:
    KLAB_STANDIN_SERVER, when set, wins (host tests)."""
    return normalize(os.environ.get("KLAB_STANDIN_SERVER") or url)


def api(server, method, path, body=None, token=None, timeout=10, raw=False):
    """One request; returns the decoded JSON (or the text when `raw`). Raises ApiError for an
    error status and Unreachable when no connection could be made. TLS is not verified: the
    stand-ins trust whatever answers (real clients check the cluster CA)."""
    import http.client
    import ssl
    import urllib.parse

    u = urllib.parse.urlsplit(normalize(server))
    host, port = u.hostname, u.port or 443
    hostport = "%s:%d" % (host, port)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    data = None if body is None else json.dumps(body).encode()
    headers = {"Accept": "application/json", "User-Agent": "klab-standin/" + VERSION}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = "Bearer " + token
    try:
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
    except ConnectionRefusedError as e:
        raise Unreachable(hostport, True, str(e))
    except (OSError, http.client.HTTPException) as e:
        raise Unreachable(hostport, False, "%s %s: %s" % (method, path, e))
    text = payload.decode("utf-8", "replace")
    if resp.status >= 400:
        reason, message = "", text.strip()
        try:
            st = json.loads(text)
            reason, message = st.get("reason", ""), st.get("message", message)
        except ValueError:
            pass
        raise ApiError(resp.status, reason, message)
    if raw:
        return text
    return json.loads(text) if text.strip() else {}


def kubeconfig_server(path):
    """(server URL, bearer token or None) of a kubeconfig's current context."""
    with open(path) as f:
        docs = yaml_load_all(f.read())
    kc = docs[0] if docs else {}
    contexts = {c.get("name"): c.get("context", {}) for c in kc.get("contexts") or []}
    ctx = contexts.get(kc.get("current-context"), {})
    clusters = {c.get("name"): c.get("cluster", {}) for c in kc.get("clusters") or []}
    users = {u.get("name"): u.get("user", {}) for u in kc.get("users") or []}
    cluster = clusters.get(ctx.get("cluster")) or next(iter(clusters.values()), {})
    user = users.get(ctx.get("user")) or next(iter(users.values()), {})
    return cluster.get("server", ""), (user or {}).get("token")


def local_server():
    """The URL of this machine's own API server (its port from apiserver.json)."""
    conf = read_json(SERVER_CONF, {}) or {}
    port = os.environ.get("KLAB_STANDIN_PORT") or conf.get("port") or DEFAULT_PORT
    return "https://127.0.0.1:%s" % port


def run(cmd, input=None):
    """(returncode, stdout, stderr) of a command; 127 when it is not installed."""
    try:
        p = subprocess.run(cmd, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        return 127, b"", ("%s: not found" % cmd[0]).encode()
    return p.returncode, p.stdout, p.stderr


def have(tool):
    import shutil
    return shutil.which(tool) is not None


# --- the stand-in programs follow ------------------------------------------------------------------
