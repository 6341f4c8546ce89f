# The stand-in API server: a small, honest simulated cluster behind HTTPS on :6443.
#
# Started by `kubeadm init` (role "init": the whole cluster lives here) and by `kubeadm join` of a
# control plane (role "member": it answers /readyz, /livez, /healthz, /version and /cluster-info,
# and nothing else — it forwards nothing). Under systemd it runs as klab-standin-apiserver.service;
# on a host (KLAB_STANDIN_ROOT set) kubeadm spawns it and writes its pid to $STATE/apiserver.pid.
#
# State (role "init"), rewritten atomically after every change:
#   $STATE/cluster.json  the kubeadm configs, nodes, etcd members, control-plane join records
#   $STATE/objects.json  applied objects by "Kind/namespace/name" (namespace "" when cluster-wide)
#   $STATE/tokens        bootstrap tokens, one a line (kubeadm init and `kubeadm token create`)
# Requests are logged to $LOG/apiserver.log (kubelet heartbeats and probes only when they fail).
#
# Protocol (JSON; errors are Kubernetes Status objects with `reason`, `message`, `code`):
#   GET  /readyz[?verbose] /livez /healthz /version   health, as kube-apiserver prints it
#   GET  /cluster-info                                 the cluster CA certificate (PEM)
#   POST /klab/v1/bootstrap {token}                    401 unless the token is known; else the
#                                                      KubeletConfiguration and cluster facts
#   POST /klab/v1/upload-certs {certificateKey}        `kubeadm init phase upload-certs`
#   POST /klab/v1/etcd/join-start {node, certificateKey, taints}   (Bearer token) a control plane
#        starts its etcd member join; 409 "etcdserver: too many learner members in cluster" while
#        another node's join is in progress
#   POST /klab/v1/etcd/join-end {node}                 the join is done (the learner is promoted)
#   POST /klab/v1/etcd/remove {node}                   `kubeadm reset` of a control plane
#   POST /klab/v1/nodes {name, internalIP, addresses[{ifindex, ifname, address, prefix}],
#        create, kubeletVersion, osImage, kernelVersion, containerRuntimeVersion}   (Bearer token)
#        registration (create: true) or heartbeat (create: false: 404 once the node is deleted)
#   GET  /klab/v1/nodes, /klab/v1/nodes/NAME           v1 List of Node / one Node (status computed)
#   DELETE /klab/v1/nodes/NAME                         `kubectl delete node`
#   POST /klab/v1/nodes/NAME/{cordon,uncordon,drain}   spec.unschedulable
#   POST /klab/v1/apply {objects, namespace}           store objects; calico-node's pool is checked
#   GET  /klab/v1/objects/KIND/NAMESPACE[/NAME]        a List / one object (Deployment/DaemonSet
#                                                      status computed from the nodes); NAMESPACE "_"
#                                                      for cluster-wide kinds
#   GET  /klab/v1/state                                cluster.json as it is now (tests, debugging)

import http.server
import ipaddress
import signal
import socketserver
import ssl
import threading

PROG = "kube-apiserver"
# A kubelet that has not posted status for this long is Unknown (node-monitor-grace-period).
NODE_GRACE = float(os.environ.get("KLAB_STANDIN_NODE_GRACE", "40"))
LEARNER_MSG = "etcdserver: too many learner members in cluster"
NOT_READY_MSG = (
    "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady "
    "message:Network plugin returns error: cni plugin not initialized"
)
# calico-node's DEFAULT_INTERFACES_TO_EXCLUDE (node/pkg/lifecycle/startup/autodetection).
CALICO_EXCLUDE = [
    r"^docker.*", r"^cbr.*", r"^dummy.*", r"^virbr.*", r"^lxcbr.*", r"^veth.*", r"^lo",
    r"^cali.*", r"^tunl.*", r"^flannel.*", r"^kube-ipvs.*", r"^cni.*",
    r"^vxlan\.calico.*", r"^vxlan-v6\.calico.*", r"^wireguard\.cali.*", r"^wg-v6\.cali.*",
    r"^nodelocaldns.*",
]
CLUSTER_SCOPED = {
    "Namespace", "Node", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
    "PriorityClass", "StorageClass", "PersistentVolume", "APIService", "IngressClass",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "CSIDriver",
    "RuntimeClass", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
}
READYZ_CHECKS = [
    "ping", "log", "etcd", "etcd-readiness", "kms-providers", "informer-sync",
    "poststarthook/start-apiserver-admission-initializer", "poststarthook/generic-apiserver-start-informers",
    "poststarthook/priority-and-fairness-config-consumer", "poststarthook/priority-and-fairness-filter",
    "poststarthook/storage-object-count-tracker-hook", "poststarthook/start-apiextensions-informers",
    "poststarthook/start-apiextensions-controllers", "poststarthook/crd-informer-synced",
    "poststarthook/start-system-namespaces-controller", "poststarthook/bootstrap-controller",
    "poststarthook/rbac/bootstrap-roles", "poststarthook/scheduling/bootstrap-system-priority-classes",
    "poststarthook/apiservice-registration-controller", "poststarthook/apiservice-discovery-controller",
    "poststarthook/kube-apiserver-autoregistration", "autoregister-completion",
    "poststarthook/apiservice-openapi-controller", "poststarthook/apiservice-openapiv3-controller",
    "shutdown",
]


def status(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class HttpError(Exception):
    def __init__(self, code, reason, message):
        Exception.__init__(self, message)
        self.code, self.reason, self.message = code, reason, message


def log(line):
    try:
        with open(os.path.join(LOG, "apiserver.log"), "a") as f:
            f.write("%s %s\n" % (iso(time.time()), line))
    except OSError:
        pass


def calico_env(ds):
    """name → value of the calico-node container's env (entries with `valueFrom` have none)."""
    for c in (((ds or {}).get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []:
        if c.get("name") == "calico-node":
            return {e.get("name"): e.get("value") for e in c.get("env") or [] if "value" in e}
    return {}


def global_unicast(ip):
    a = ipaddress.ip_address(ip)
    return not (a.is_loopback or a.is_link_local or a.is_multicast or a.is_unspecified
                or ip == "255.255.255.255")


def autodetect(method, node):
    """The address/prefix calico-node would pick on `node` with IP_AUTODETECTION_METHOD `method`
    (calico's autodetection_methods.go over the interface addresses the kubelet reported), or
    None when calico-node would find none (and exit)."""
    ifaces = []  # [(name, [(ip, prefix)])] in ifindex order, as `ip -o -4 addr` lists them
    for a in node.get("addresses") or []:
        if not ifaces or ifaces[-1][0] != a["ifname"]:
            ifaces.append((a["ifname"], []))
        ifaces[-1][1].append((a["address"], int(a["prefix"])))

    def first(incl, excl, cidrs):
        try:
            inc = re.compile("(" + ")|(".join(incl) + ")") if incl else None
            exc = re.compile("(" + ")|(".join(excl) + ")") if excl else None
        except re.error:
            return None
        # calico-node walks the interfaces in REVERSE order of the kernel's list ("to maintain
        # behavior with older versions", interfaces.go), then each interface's addresses in order.
        for name, addrs in reversed(ifaces):
            if (inc and not inc.search(name)) or (exc and exc.search(name)):
                continue
            for ip, prefix in addrs:
                if global_unicast(ip) and (not cidrs or any(ipaddress.ip_address(ip) in c for c in cidrs)):
                    return "%s/%d" % (ip, prefix)
        return None

    def regexes(s):
        return re.split(r"\s*,\s*", s)

    if method in (None, "", "first-found"):
        return first([], CALICO_EXCLUDE, None)
    if method.startswith("interface="):
        return first(regexes(method[len("interface="):]), [], None)
    if method.startswith("skip-interface="):
        return first([], CALICO_EXCLUDE + regexes(method[len("skip-interface="):]), None)
    if method.startswith("cidr="):
        try:
            nets = [ipaddress.ip_network(c, strict=False) for c in regexes(method[len("cidr="):])]
        except ValueError:
            return None
        return first([], [], nets)
    if method.startswith("can-reach="):
        # Real calico-node asks the kernel which source address routes to the destination; the
        # stand-in has no routes of the node, so it treats can-reach like first-found.
        return first([], CALICO_EXCLUDE, None)
    if method.startswith("kubernetes-internal-ip"):
        ip = node.get("internalIP")
        for _, addrs in ifaces:
            for a, prefix in addrs:
                if a == ip:
                    return "%s/%d" % (a, prefix)
        return None  # calico: "Unable to parse CIDR" of the bare IP, calico-node exits
    return None  # "Invalid IP autodetection method": calico-node terminates


class Cluster:
    def __init__(self, role):
        self.role = role
        self.lock = threading.RLock()
        self.started = time.time()
        self.heartbeat = {}
        if role == "init":
            self.c = read_json(CLUSTER_STATE)
            if self.c is None:
                die("%s (stand-in): no %s: `kubeadm init` writes it" % (PROG, CLUSTER_STATE))
            self.objects = read_json(OBJECTS_STATE, {}) or {}
            for n in self.c.get("nodes", {}):
                self.heartbeat[n] = self.started
        else:
            self.c, self.objects = {}, {}

    def save(self):
        write_json(CLUSTER_STATE, self.c, 0o600)  # it holds the certificate key

    def save_objects(self):
        write_json(OBJECTS_STATE, self.objects)

    # --- facts -----------------------------------------------------------------------------------

    def pod_subnet(self):
        return ((self.c.get("clusterConfiguration") or {}).get("networking") or {}).get("podSubnet")

    def tokens(self):
        try:
            with open(TOKENS) as f:
                return {t.strip() for t in f if t.strip()}
        except OSError:
            return set()

    def check_token(self, token):
        if not token or token not in self.tokens():
            raise HttpError(401, "Unauthorized", "Unauthorized")

    def calico(self):
        return self.objects.get("DaemonSet/kube-system/calico-node")

    def node_ready(self, name, now):
        if now - self.heartbeat.get(name, 0) > NODE_GRACE:
            return "Unknown", "NodeStatusUnknown", "Kubelet stopped posting node status."
        if not self.calico():
            return "False", "KubeletNotReady", NOT_READY_MSG
        return "True", "KubeletReady", "kubelet is posting ready status"

    def node_object(self, n, now):
        name = n["name"]
        ready, reason, message = self.node_ready(name, now)
        labels = {
            "beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
        }
        annotations = {
            "node.alpha.kubernetes.io/ttl": "0",
            "volumes.kubernetes.io/controller-managed-attach-detach": "true",
        }
        spec = {}
        taints = list(n.get("taints") or [])
        if n.get("controlPlane"):
            labels["node-role.kubernetes.io/control-plane"] = ""
            labels["node.kubernetes.io/exclude-from-external-load-balancers"] = ""
        ds = self.calico()
        if ds:
            env = calico_env(ds)
            ip = env.get("IP") or "autodetect"
            if ip == "autodetect":
                addr = autodetect(env.get("IP_AUTODETECTION_METHOD"), n)
            elif ip == "none":
                addr = None
            else:
                addr = ip if "/" in ip else ip + "/32"
            if addr:
                annotations["projectcalico.org/IPv4Address"] = addr
        if ready != "True":
            taints.append({"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"})
        if n.get("unschedulable"):
            spec["unschedulable"] = True
            taints.append({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule",
                           "timeAdded": iso(n.get("cordonedAt", now))})
        if taints:
            spec["taints"] = taints
        hb = self.heartbeat.get(name, 0)
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": n.get("uid", ""), "creationTimestamp": iso(n["createdAt"]),
                         "labels": labels, "annotations": annotations},
            "spec": spec,
            "status": {
                "addresses": [{"type": "InternalIP", "address": n["internalIP"]},
                              {"type": "Hostname", "address": name}],
                "conditions": [{"type": "Ready", "status": ready, "reason": reason, "message": message,
                                "lastHeartbeatTime": iso(hb), "lastTransitionTime": iso(n["createdAt"])}],
                "nodeInfo": {
                    "architecture": "amd64", "operatingSystem": "linux",
                    "kubeletVersion": n.get("kubeletVersion", ""), "osImage": n.get("osImage", ""),
                    "kernelVersion": n.get("kernelVersion", ""),
                    "containerRuntimeVersion": n.get("containerRuntimeVersion", ""),
                },
            },
        }

    def nodes(self):
        now = time.time()
        return [self.node_object(self.c["nodes"][k], now) for k in sorted(self.c.get("nodes", {}))]

    def any_ready(self):
        return any(n["status"]["conditions"][0]["status"] == "True" for n in self.nodes())

    def object(self, kind, ns, name):
        obj = self.objects.get("%s/%s/%s" % (kind, ns, name))
        if obj is None:
            return None
        obj = json.loads(json.dumps(obj))
        if kind == "Deployment":
            want = (obj.get("spec") or {}).get("replicas", 1)
            have = want if self.any_ready() else 0
            obj["status"] = {"observedGeneration": 1, "replicas": want, "updatedReplicas": want,
                             "readyReplicas": have, "availableReplicas": have,
                             "unavailableReplicas": want - have,
                             "conditions": [{"type": "Available", "status": "True" if have >= want else "False"}]}
            obj.setdefault("metadata", {})["generation"] = 1
        elif kind == "DaemonSet":
            nodes = self.nodes()
            ready = sum(1 for n in nodes if n["status"]["conditions"][0]["status"] == "True")
            obj["status"] = {"observedGeneration": 1, "desiredNumberScheduled": len(nodes),
                             "currentNumberScheduled": len(nodes), "updatedNumberScheduled": len(nodes),
                             "numberReady": ready, "numberAvailable": ready}
            obj.setdefault("metadata", {})["generation"] = 1
        return obj

    # --- changes ---------------------------------------------------------------------------------

    def register(self, body, token):
        self.check_token(token)
        name = body.get("name")
        ip = body.get("internalIP")
        if not name or not ip:
            raise HttpError(400, "BadRequest", "a node needs a name and an InternalIP")
        nodes = self.c.setdefault("nodes", {})
        n = nodes.get(name)
        if n is None and not body.get("create"):
            raise HttpError(404, "NotFound", 'nodes "%s" not found' % name)
        now = time.time()
        self.heartbeat[name] = now
        fresh = {k: body.get(k, "") for k in ("internalIP", "kubeletVersion", "osImage", "kernelVersion",
                                               "containerRuntimeVersion")}
        fresh["addresses"] = [{"ifindex": int(a.get("ifindex", 0)), "ifname": a["ifname"],
                               "address": a["address"], "prefix": int(a["prefix"])}
                              for a in body.get("addresses") or []]
        if n is None:
            n = {"name": name, "createdAt": now, "uid": "%08x" % int(now * 1000 % 0xFFFFFFFF)}
            n["controlPlane"] = name == self.c.get("initNode") or any(
                m["name"] == name for m in self.c.get("etcdMembers", []))
            n["taints"] = self.default_taints(name, n["controlPlane"])
            n.update(fresh)
            nodes[name] = n
            self.save()
            log("node %s registered: InternalIP %s" % (name, ip))
        elif any(n.get(k) != v for k, v in fresh.items()):
            n.update(fresh)
            self.save()
            log("node %s updated: InternalIP %s" % (name, ip))
        return self.node_object(n, now)

    def default_taints(self, name, control_plane):
        if name == self.c.get("initNode"):
            reg = (self.c.get("initConfiguration") or {}).get("nodeRegistration") or {}
        else:
            reg = (self.c.get("joinTaints") or {}).get(name)
            reg = {"taints": reg} if reg is not None else {}
        if "taints" in reg:
            return reg["taints"] or []
        return [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}] if control_plane else []

    def delete_node(self, name):
        if name not in self.c.get("nodes", {}):
            raise HttpError(404, "NotFound", 'nodes "%s" not found' % name)
        del self.c["nodes"][name]
        self.heartbeat.pop(name, None)
        self.save()
        log("node %s deleted" % name)
        return {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": name, "kind": "nodes"}}

    def cordon(self, name, on):
        n = self.c.get("nodes", {}).get(name)
        if n is None:
            raise HttpError(404, "NotFound", 'nodes "%s" not found' % name)
        changed = bool(n.get("unschedulable")) != on
        n["unschedulable"] = on
        if on and changed:
            n["cordonedAt"] = time.time()
        self.save()
        return {"changed": changed, "node": self.node_object(n, time.time())}

    def join_start(self, body, token):
        self.check_token(token)
        node = body.get("node")
        if not node:
            raise HttpError(400, "BadRequest", "join-start needs the node's name")
        certs = self.c.get("uploadedCerts")
        if not certs or time.time() - certs.get("at", 0) > 7200:
            raise HttpError(404, "NotFound", 'secrets "kubeadm-certs" not found')
        if body.get("certificateKey") != certs.get("certificateKey"):
            raise HttpError(400, "BadRequest",
                            "error decoding secret data with provided key: cipher: message authentication failed")
        now = time.time()
        members = self.c.setdefault("etcdMembers", [])
        learners = [m for m in members if m.get("learner") and m["name"] != node]
        if learners:
            self.c.setdefault("refusedControlPlaneJoins", []).append(
                {"node": node, "at": now, "message": LEARNER_MSG, "learner": learners[0]["name"]})
            self.save()
            log("control-plane join of %s refused: %s is still a learner" % (node, learners[0]["name"]))
            raise HttpError(409, "Conflict", LEARNER_MSG)
        for m in [m for m in members if m["name"] == node]:
            members.remove(m)  # a node joining again (kubeadm's AddMember finds its own member)
        members.append({"name": node, "learner": True, "addedAt": now})
        self.c.setdefault("controlPlaneJoins", []).append({"node": node, "start": now, "end": None})
        if "taints" in body:
            self.c.setdefault("joinTaints", {})[node] = body["taints"]
        n = self.c.get("nodes", {}).get(node)
        if n is not None:
            n["controlPlane"] = True
            n["taints"] = self.default_taints(node, True)
        self.save()
        log("control-plane join of %s started (etcd learner added)" % node)
        return {"node": node, "start": now}

    def join_end(self, body, token):
        self.check_token(token)
        node = body.get("node")
        now = time.time()
        for m in self.c.get("etcdMembers", []):
            if m["name"] == node:
                m["learner"] = False
        for j in reversed(self.c.get("controlPlaneJoins", [])):
            if j["node"] == node and j["end"] is None:
                j["end"] = now
                self.save()
                log("control-plane join of %s ended (learner promoted)" % node)
                return j
        raise HttpError(404, "NotFound", "no control-plane join of %s in progress" % node)

    def etcd_remove(self, body):
        node = body.get("node")
        before = len(self.c.get("etcdMembers", []))
        self.c["etcdMembers"] = [m for m in self.c.get("etcdMembers", []) if m["name"] != node]
        for j in self.c.get("controlPlaneJoins", []):
            if j["node"] == node and j["end"] is None:
                j["abandoned"] = True
                j["end"] = time.time()
        self.save()
        return {"removed": before - len(self.c["etcdMembers"])}

    def upload_certs(self, body):
        key = body.get("certificateKey") or ""
        if not re.fullmatch(r"[0-9a-f]{64}", key):
            raise HttpError(400, "BadRequest", "invalid certificate key: it must be 32 bytes, hex-encoded")
        self.c["uploadedCerts"] = {"certificateKey": key, "at": time.time()}
        self.save()
        return {"uploaded": True}

    def apply(self, body):
        default_ns = body.get("namespace") or "default"
        staged = []
        for obj in body.get("objects") or []:
            if not isinstance(obj, dict) or not obj.get("kind") or not obj.get("apiVersion"):
                raise HttpError(400, "BadRequest", "Object 'Kind' is missing in %s" % json.dumps(obj)[:200])
            meta = obj.setdefault("metadata", {})
            if not meta.get("name"):
                raise HttpError(422, "Invalid", "%s: metadata.name: Required value" % obj["kind"])
            kind = obj["kind"]
            ns = "" if kind in CLUSTER_SCOPED else (meta.get("namespace") or default_ns)
            if ns:
                meta["namespace"] = ns
            if kind == "DaemonSet" and meta["name"] == "calico-node":
                self.check_calico(obj)
            staged.append(("%s/%s/%s" % (kind, ns, meta["name"]), obj))
        results = []
        for key, obj in staged:
            existed = key in self.objects
            created = ((self.objects.get(key) or {}).get("metadata") or {}).get("creationTimestamp")
            obj["metadata"]["creationTimestamp"] = created or iso(time.time())
            self.objects[key] = obj
            group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
            results.append({"kind": obj["kind"], "group": group, "name": obj["metadata"]["name"],
                            "namespace": obj["metadata"].get("namespace", ""), "existed": existed})
        self.save_objects()
        log("applied %d objects%s" % (len(staged), " (calico-node)" if any(
            k == "DaemonSet/kube-system/calico-node" for k, _ in staged) else ""))
        return {"results": results}

    def check_calico(self, ds):
        pool = calico_env(ds).get("CALICO_IPV4POOL_CIDR")
        subnet = self.pod_subnet()
        if not pool or not subnet:
            return
        try:
            p = ipaddress.ip_network(pool, strict=False)
            s = [ipaddress.ip_network(x.strip(), strict=False) for x in subnet.split(",")]
        except ValueError as e:
            raise HttpError(422, "Invalid", 'DaemonSet.apps "calico-node" is invalid: CALICO_IPV4POOL_CIDR %s: %s' % (pool, e))
        platform = "[%s]" % " ".join(str(x) for x in s)
        if not any(p.version == x.version and p.subnet_of(x) for x in s):
            raise HttpError(422, "Invalid",
                            "Could not resolve CalicoNetwork IPPool and kubeadm configuration: IPPool %s is not "
                            "within the platform's configured pod network CIDR(s) %s" % (pool, platform))
        if p not in s:
            raise HttpError(422, "Invalid",
                            "CALICO_IPV4POOL_CIDR %s is not kubeadm's networking.podSubnet %s (the klab stand-in "
                            "requires the pool to be the whole pod network)" % (pool, subnet))


def readyz(role, verbose, path):
    if not verbose:
        return "ok"
    checks = READYZ_CHECKS if path == "/readyz" else [c for c in READYZ_CHECKS if c not in (
        "etcd-readiness", "informer-sync", "shutdown")]
    what = {"/readyz": "readyz", "/livez": "livez", "/healthz": "healthz"}[path]
    return "".join("[+]%s ok\n" % c for c in checks) + "%s check passed\n" % what


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "klab-standin-apiserver"
    cluster = None
    tls = None

    def setup(self):
        self.request.settimeout(15)
        self.request = self.tls.wrap_socket(self.request, server_side=True)
        http.server.BaseHTTPRequestHandler.setup(self)

    def log_message(self, fmt, *args):
        pass

    def reply(self, code, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else (
            body.encode() if isinstance(body, str) else (json.dumps(body) + "\n").encode())
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw.decode() or "{}")
        except ValueError:
            raise HttpError(400, "BadRequest", "the request body is not JSON")

    def token(self):
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def dispatch(self, method):
        import urllib.parse
        u = urllib.parse.urlsplit(self.path)
        path, query = u.path.rstrip("/") or "/", urllib.parse.parse_qs(u.query, keep_blank_values=True)
        try:
            code, out, ctype, quiet = self.answer(method, path, query)
        except HttpError as e:
            code, out, ctype, quiet = e.code, status(e.code, e.reason, e.message), "application/json", False
        except Exception as e:  # noqa: BLE001 — a stand-in answers 500 and keeps serving
            code, out, ctype, quiet = 500, status(500, "InternalError", "%s: %s" % (type(e).__name__, e)), \
                "application/json", False
        self.reply(code, out, ctype)
        if not quiet:
            log("%s %s %d" % (method, self.path, code))

    def answer(self, method, path, query):
        """(code, body, content type, quiet): quiet answers (probes, heartbeats) are not logged."""
        c = self.cluster
        if method == "GET" and path in ("/readyz", "/livez", "/healthz"):
            return 200, readyz(c.role, "verbose" in query, path), "text/plain; charset=utf-8", True
        if method == "GET" and path == "/version":
            major, minor = VERSION[1:].split(".")[:2]
            return 200, {"major": major, "minor": minor, "gitVersion": VERSION,
                         "platform": "linux/amd64", "klab": "stand-in"}, "application/json", True
        if method == "GET" and path == "/cluster-info":
            with open(PKI + "/ca.crt") as f:
                return 200, f.read(), "application/x-pem-file", False
        if c.role != "init":
            raise HttpError(503, "ServiceUnavailable",
                            "klab stand-in: this API server (a joined control plane) only serves /readyz, "
                            "/livez, /healthz, /version and /cluster-info; the cluster lives on the first "
                            "control plane's")
        body = self.body() if method == "POST" else None
        with c.lock:
            out = self.route(method, path, body)
        heartbeat = method == "POST" and path == "/klab/v1/nodes" and not body.get("create")
        return 200, out, "application/json", heartbeat or method == "GET"

    def route(self, method, path, body):
        c = self.cluster
        parts = path.split("/")[1:]
        if parts[:2] != ["klab", "v1"]:
            raise HttpError(404, "NotFound", "the server could not find the requested resource")
        rest = parts[2:]
        if method == "POST" and rest == ["bootstrap"]:
            c.check_token(body.get("token"))
            return {"kubeletConfiguration": c.c.get("kubeletConfiguration") or {},
                    "clusterName": (c.c.get("clusterConfiguration") or {}).get("clusterName", "kubernetes"),
                    "networking": (c.c.get("clusterConfiguration") or {}).get("networking") or {}}
        if method == "POST" and rest == ["upload-certs"]:
            return c.upload_certs(body)
        if method == "POST" and rest == ["etcd", "join-start"]:
            return c.join_start(body, self.token())
        if method == "POST" and rest == ["etcd", "join-end"]:
            return c.join_end(body, self.token())
        if method == "POST" and rest == ["etcd", "remove"]:
            return c.etcd_remove(body)
        if rest == ["nodes"]:
            if method == "POST":
                return c.register(body, self.token())
            if method == "GET":
                return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": c.nodes()}
        if len(rest) == 2 and rest[0] == "nodes":
            if method == "GET":
                n = c.c.get("nodes", {}).get(rest[1])
                if n is None:
                    raise HttpError(404, "NotFound", 'nodes "%s" not found' % rest[1])
                return c.node_object(n, time.time())
            if method == "DELETE":
                return c.delete_node(rest[1])
        if len(rest) == 3 and rest[0] == "nodes" and method == "POST" and rest[2] in ("cordon", "uncordon", "drain"):
            return c.cordon(rest[1], rest[2] != "uncordon")
        if method == "POST" and rest == ["apply"]:
            return c.apply(body)
        if method == "GET" and len(rest) == 3 and rest[0] == "objects":
            kind, ns = rest[1], "" if rest[2] == "_" else rest[2]
            items = [c.object(kind, ns, k.split("/", 2)[2]) for k in sorted(c.objects)
                     if k.startswith("%s/%s/" % (kind, ns))]
            return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items}
        if method == "GET" and len(rest) == 4 and rest[0] == "objects":
            kind, ns, name = rest[1], "" if rest[2] == "_" else rest[2], rest[3]
            obj = c.object(kind, ns, name)
            if obj is None:
                raise HttpError(404, "NotFound", '%s "%s" not found' % (kind, name))
            return obj
        if method == "GET" and rest == ["state"]:
            return c.c
        raise HttpError(404, "NotFound", "the server could not find the requested resource")


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def handle_error(self, request, client_address):
        log("connection from %s failed: %s" % (client_address[0], sys.exc_info()[1]))


def main():
    conf = read_json(SERVER_CONF, {}) or {}
    role = conf.get("role", "init")
    port = int(os.environ.get("KLAB_STANDIN_PORT") or conf.get("port") or DEFAULT_PORT)
    bind = os.environ.get("KLAB_STANDIN_BIND") or ("127.0.0.1" if R else conf.get("bind", "0.0.0.0"))
    cert, key = PKI + "/apiserver.crt", PKI + "/apiserver.key"
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        tls.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        die("%s (stand-in): cannot load %s / %s: %s" % (PROG, cert, key, e))
    Handler.cluster = Cluster(role)
    Handler.tls = tls
    try:
        httpd = Server((bind, port), Handler)
    except OSError as e:
        die("%s (stand-in): cannot listen on %s:%d: %s" % (PROG, bind, port, e))
    signal.signal(signal.SIGTERM, lambda *_: (log("stopping (SIGTERM)"), os._exit(0)))
    log("serving (%s) on %s:%d, %s" % (role, bind, port, VERSION))
    sys.stderr.write("klab stand-in API server (not Kubernetes), role %s, on %s:%d\n" % (role, bind, port))
    sys.stderr.flush()
    httpd.serve_forever()


main()
