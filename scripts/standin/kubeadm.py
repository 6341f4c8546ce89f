# kubeadm (stand-in): answers klab's version and image queries, checks the --config it is given
# against kubeadm v1beta4, writes what the real kubeadm writes (pki, kubeconfigs, static-pod
# manifests, the kubelet's kubeadm-flags.env and config.yaml), and runs the stand-in API server
# (init: the cluster; join of a control plane: a member that serves /readyz).

import base64
import hashlib
import ipaddress
import random
import shutil
import signal
import socket

PROG = "kubeadm"
APISERVER_DIR = "/usr/lib/klab-standin"
DEFAULT_CRI = "unix:///var/run/containerd/containerd.sock"
TOKEN_RE = re.compile(r"^[a-z0-9]{6}\.[a-z0-9]{16}$")

# --- kubeadm.k8s.io/v1beta4 (cmd/kubeadm/app/apis/kubeadm/v1beta4/types.go) ------------------------
# A schema is "s" (a scalar), "any", "map" (string keys, scalar values), [schema] (a list) or a dict
# of field → schema. Unknown fields are refused, as `kubeadm config validate` does (init and join
# themselves only warn).
ARG = {"name": "s", "value": "s"}
ENVVAR = {"name": "s", "value": "s", "valueFrom": "any"}
HOSTPATH = {"name": "s", "hostPath": "s", "mountPath": "s", "readOnly": "s", "pathType": "s"}
COMPONENT = {"extraArgs": [ARG], "extraVolumes": [HOSTPATH], "extraEnvs": [ENVVAR]}
APISERVER = dict(COMPONENT, certSANs=["s"])
TAINT = {"key": "s", "value": "s", "effect": "s", "timeAdded": "s"}
NODE_REGISTRATION = {"name": "s", "criSocket": "s", "taints": [TAINT], "kubeletExtraArgs": [ARG],
                     "ignorePreflightErrors": ["s"], "imagePullPolicy": "s", "imagePullSerial": "s"}
API_ENDPOINT = {"advertiseAddress": "s", "bindPort": "s"}
BOOTSTRAP_TOKEN = {"token": "s", "description": "s", "ttl": "s", "expires": "s", "usages": ["s"],
                   "groups": ["s"]}
PATCHES = {"directory": "s"}
TIMEOUTS = {k: "s" for k in ("controlPlaneComponentHealthCheck", "kubeletHealthCheck", "kubernetesAPICall",
                             "etcdAPICall", "tlsBootstrap", "discovery", "upgradeManifests")}
ETCD = {
    "local": {"imageRepository": "s", "imageTag": "s", "dataDir": "s", "extraArgs": [ARG],
              "extraEnvs": [ENVVAR], "serverCertSANs": ["s"], "peerCertSANs": ["s"]},
    "external": {"endpoints": ["s"], "caFile": "s", "certFile": "s", "keyFile": "s"},
}
NETWORKING = {"serviceSubnet": "s", "podSubnet": "s", "dnsDomain": "s"}
DISCOVERY = {
    "bootstrapToken": {"token": "s", "apiServerEndpoint": "s", "caCertHashes": ["s"],
                       "unsafeSkipCAVerification": "s"},
    "file": {"kubeConfigPath": "s"},
    "tlsBootstrapToken": "s",
}
TYPE_META = {"apiVersion": "s", "kind": "s"}
SCHEMAS = {
    "InitConfiguration": dict(TYPE_META, bootstrapTokens=[BOOTSTRAP_TOKEN], dryRun="s",
                              nodeRegistration=NODE_REGISTRATION, localAPIEndpoint=API_ENDPOINT,
                              certificateKey="s", skipPhases=["s"], patches=PATCHES, timeouts=TIMEOUTS),
    "ClusterConfiguration": dict(TYPE_META, etcd=ETCD, networking=NETWORKING, kubernetesVersion="s",
                                 controlPlaneEndpoint="s", apiServer=APISERVER, controllerManager=COMPONENT,
                                 scheduler=COMPONENT, dns={"imageRepository": "s", "imageTag": "s",
                                                           "disabled": "s"},
                                 proxy={"disabled": "s"}, certificatesDir="s", imageRepository="s",
                                 featureGates="map", clusterName="s", encryptionAlgorithm="s",
                                 certificateValidityPeriod="s", caCertificateValidityPeriod="s"),
    "JoinConfiguration": dict(TYPE_META, dryRun="s", nodeRegistration=NODE_REGISTRATION, caCertPath="s",
                              discovery=DISCOVERY, controlPlane={"localAPIEndpoint": API_ENDPOINT,
                                                                 "certificateKey": "s"},
                              skipPhases=["s"], patches=PATCHES, timeouts=TIMEOUTS),
}
REQUIRED = {"JoinConfiguration": ["discovery"], "JoinConfiguration.discovery.bootstrapToken": ["token"]}
KUBEADM_API = "kubeadm.k8s.io/v1beta4"
OTHER_KINDS = {"KubeletConfiguration": "kubelet.config.k8s.io/v1beta1",
               "KubeProxyConfiguration": "kubeproxy.config.k8s.io/v1alpha1"}
ENCRYPTION = ("RSA-2048", "RSA-3072", "RSA-4096", "ECDSA-P256", "ECDSA-P384")


def fail(msg, code=1):
    die(msg if msg.startswith(("error", "[")) else "kubeadm (stand-in): " + msg, code)


def check_fields(value, schema, path, kind):
    where = ("%s." % path) if path else ""
    if schema == "any":
        return
    if schema == "s":
        if isinstance(value, (dict, list)):
            fail('error: %s: strict decoding error: field "%s" must be a scalar, not %s'
                 % (kind, path, "an object" if isinstance(value, dict) else "a list"))
        return
    if schema == "map":
        if not isinstance(value, dict):
            fail('error: %s: strict decoding error: field "%s" must be a map' % (kind, path))
        return
    if isinstance(schema, list):
        if not isinstance(value, list):
            fail('error: %s: strict decoding error: field "%s" must be a list (kubeadm v1beta4), not %s'
                 % (kind, path, type(value).__name__))
        for i, item in enumerate(value):
            check_fields(item, schema[0], "%s[%d]" % (path, i), kind)
        return
    if not isinstance(value, dict):
        fail('error: %s: strict decoding error: field "%s" must be an object' % (kind, path))
    for k, v in value.items():
        if k not in schema:
            fail('error: %s: strict decoding error: unknown field "%s%s" (kubeadm %s; the stand-in refuses '
                 'unknown fields, as `kubeadm config validate` does — init and join would only warn)'
                 % (kind, where, k, KUBEADM_API))
        check_fields(v, schema[k], where + k, kind)
    for k in REQUIRED.get(kind + ("." + path if path else ""), []):
        if k not in value:
            fail('error: %s: %s%s: Required value' % (kind, where, k))


def load_config(path):
    """The --config documents by kind, checked against v1beta4."""
    try:
        with open(path) as f:
            docs = yaml_load_all(f.read())
    except OSError as e:
        fail("config %s: %s" % (path, e.strerror))
    except Exception as e:  # yaml.YAMLError
        fail("error: unable to parse %s: %s" % (path, e))
    out = {}
    for d in docs:
        if not isinstance(d, dict):
            fail("error: %s: a document is not a mapping" % path)
        kind, api_version = d.get("kind"), d.get("apiVersion")
        if not kind or not api_version:
            fail("error: %s: a document without apiVersion/kind" % path)
        if kind in SCHEMAS:
            if api_version != KUBEADM_API:
                fail('error: %s: apiVersion "%s" is not supported by kubeadm %s: only %s is (v1beta3 was '
                     'removed in 1.36)' % (kind, api_version, VERSION, KUBEADM_API))
            check_fields(d, SCHEMAS[kind], "", kind)
        elif kind in OTHER_KINDS:
            if api_version != OTHER_KINDS[kind]:
                fail('error: no kind "%s" is registered for version "%s"' % (kind, api_version))
        else:
            fail('error: no kind "%s" is registered for version "%s" (the stand-in knows %s)'
                 % (kind, api_version, ", ".join(sorted(list(SCHEMAS) + list(OTHER_KINDS)))))
        if kind in out:
            fail("error: %s: more than one %s" % (path, kind))
        out[kind] = d
    kc = out.get("KubeletConfiguration")
    if kc is not None and kc.get("cgroupDriver") != "systemd":
        fail('error: KubeletConfiguration: cgroupDriver is %s: the stand-in requires "systemd" (containerd '
             'runs with SystemdCgroup = true; the kubelet\'s fallback must agree)'
             % (repr(kc.get("cgroupDriver")) if "cgroupDriver" in kc else "not set"))
    cc = out.get("ClusterConfiguration") or {}
    if cc.get("encryptionAlgorithm", "RSA-2048") not in ENCRYPTION:
        fail('error: ClusterConfiguration: encryptionAlgorithm: Unsupported value: "%s": supported values: %s'
             % (cc["encryptionAlgorithm"], ", ".join('"%s"' % e for e in ENCRYPTION)))
    return out


def flag(args, name):
    """The value of --name VALUE / --name=VALUE, or None."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None


def keep_config(args, what):
    """The --config file, copied beside the log so the test can read what kubeadm was given."""
    config = flag(args, "--config")
    if not config:
        fail("%s needs --config" % what)
    config = rooted_input(config)
    if not os.path.isfile(config):
        fail("config %s: no such file" % config)
    n = len([f for f in os.listdir(LOG) if f.startswith("config-")]) + 1
    shutil.copyfile(config, os.path.join(LOG, "config-%d-%s.yaml" % (n, what)))
    return config


# --- certificates and kubeconfigs ---------------------------------------------------------------

def need_openssl(what):
    if not have("openssl"):
        fail("%s needs openssl (apt-get install openssl): the stand-in makes real keys and certificates "
             "and the API server serves TLS with them" % what)


def openssl(*cmd):
    rc, out, err = run(["openssl"] + list(cmd))
    if rc != 0:
        fail("openssl %s failed: %s" % (cmd[0], err.decode(errors="replace").strip()))
    return out


def pem(name, cn):
    """A self-signed EC key and certificate: the files' names and modes are what matter."""
    os.makedirs(os.path.dirname(PKI + "/" + name), exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", "365", "-subj", "/CN=" + cn.replace("/", "-"),
            "-keyout", PKI + "/%s.key" % name, "-out", PKI + "/%s.crt" % name)
    os.chmod(PKI + "/%s.key" % name, 0o600)


def apiserver_cert(sans):
    """The API server's serving certificate, signed by the cluster CA, with kube-apiserver's SANs."""
    key, csr, crt = PKI + "/apiserver.key", PKI + "/apiserver.csr", PKI + "/apiserver.crt"
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", "/CN=kube-apiserver", "-keyout", key, "-out", csr)
    os.chmod(key, 0o600)
    ext = PKI + "/apiserver.ext"
    alt = []
    for s in sans:
        try:
            ipaddress.ip_address(s)
            alt.append("IP:" + s)
        except ValueError:
            alt.append("DNS:" + s)
    with open(ext, "w") as f:
        f.write("subjectAltName=%s\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,"
                "keyEncipherment\n" % ",".join(dict.fromkeys(alt)))
    openssl("x509", "-req", "-in", csr, "-CA", PKI + "/ca.crt", "-CAkey", PKI + "/ca.key",
            "-set_serial", "0x%x" % random.getrandbits(63), "-days", "365", "-extfile", ext, "-out", crt)
    os.remove(csr)
    os.remove(ext)


def ca_hash(pem_text):
    """sha256:<hex> of the CA's SubjectPublicKeyInfo, as `--discovery-token-ca-cert-hash` has it."""
    rc, pub, err = run(["openssl", "x509", "-pubkey", "-noout"], input=pem_text.encode())
    if rc != 0:
        fail("error: the cluster CA is not a certificate: %s" % err.decode(errors="replace").strip())
    rc, der, err = run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub)
    if rc != 0:
        fail("error: the cluster CA's public key: %s" % err.decode(errors="replace").strip())
    return "sha256:" + hashlib.sha256(der).hexdigest()


def b64(path):
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def kubeconfig(path, user, server, token=None):
    text = """apiVersion: v1
kind: Config
clusters:
- cluster:
    certificate-authority-data: %s
    server: https://%s
  name: kubernetes
contexts:
- context:
    cluster: kubernetes
    user: %s
  name: %s@kubernetes
current-context: %s@kubernetes
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
""" % (b64(PKI + "/ca.crt"), server, user, user, user, user,
       b64(PKI + "/apiserver-kubelet-client.crt"), b64(PKI + "/apiserver-kubelet-client.key"))
    if token:
        text += "    # klab stand-in: the kubelet authenticates with its bootstrap token\n    token: %s\n" % token
    text += "preferences: {}\n"
    write_atomic(path, text, 0o600)


def manifests(*components):
    os.makedirs(K + "/manifests", exist_ok=True)
    for c in components:
        with open(K + "/manifests/%s.yaml" % c, "w") as f:
            f.write("apiVersion: v1\nkind: Pod\nmetadata:\n  name: %s\n  namespace: kube-system\n  annotations:\n"
                    "    klab.dev/stand-in: \"true\"\nspec:\n  containers: []\n" % c)


def need_ca():
    def nonempty(p):
        return os.path.isfile(p) and os.path.getsize(p) > 0
    if not (nonempty(PKI + "/ca.crt") and nonempty(PKI + "/ca.key")):
        fail("%s/ca.crt and ca.key must exist before init (klab places its CA)" % PKI)


# --- the kubelet's files ------------------------------------------------------------------------

def kubelet_files(reg, kubelet_config, service_subnet, dns_domain):
    """kubeadm-flags.env (as kubeadm's kubelet-start phase writes it) and config.yaml."""
    args = {"container-runtime-endpoint": reg.get("criSocket") or DEFAULT_CRI}
    name = reg.get("name") or socket.gethostname().lower()
    if name != socket.gethostname().lower():
        args["hostname-override"] = name
    for a in reg.get("kubeletExtraArgs") or []:
        args[a.get("name")] = a.get("value", "")
    line = " ".join("--%s=%s" % (k, args[k]) for k in sorted(args))
    write_atomic(FLAGS_ENV, 'KUBELET_KUBEADM_ARGS="%s"\n' % line)
    cfg = {"apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration"}
    cfg.update(kubelet_config or {})
    try:
        net = ipaddress.ip_network((service_subnet or "10.96.0.0/12").split(",")[0], strict=False)
        cfg.setdefault("clusterDNS", [str(net.network_address + 10)])
    except ValueError:
        pass
    cfg.setdefault("clusterDomain", dns_domain or "cluster.local")
    cfg.setdefault("staticPodPath", "/etc/kubernetes/manifests")
    cfg.setdefault("rotateCertificates", True)
    write_atomic(KUBELET_DIR + "/config.yaml", "# klab stand-in: written by kubeadm\n" + yaml_dump(cfg))
    if under_systemd():
        print("[kubelet-start] Starting the kubelet")
        run(["systemctl", "restart", "kubelet"])


# --- the stand-in API server --------------------------------------------------------------------

def apiserver_program():
    here = os.path.dirname(os.path.realpath(sys.argv[0]))
    local = os.path.normpath(os.path.join(here, "..", "lib", "klab-standin", "apiserver"))
    return local if os.path.exists(local) else APISERVER_DIR + "/apiserver"


def stop_server():
    if under_systemd():
        run(["systemctl", "disable", "--now", UNIT])
    pid = None
    try:
        with open(SERVER_PID) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        pass
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    for f in (SERVER_PID,):
        if os.path.exists(f):
            os.remove(f)


def start_server(role, port):
    """Run the API server (systemd unit, or a background process on a host) and wait for /readyz."""
    write_json(SERVER_CONF, {"role": role, "port": port, "bind": "0.0.0.0"})
    port = int(os.environ.get("KLAB_STANDIN_PORT") or port)
    out = os.path.join(LOG, "apiserver.out")
    proc = None
    if under_systemd():
        run(["systemctl", "enable", UNIT])
        rc, _, err = run(["systemctl", "restart", UNIT])
        if rc != 0:
            fail("error: systemctl restart %s: %s" % (UNIT, err.decode(errors="replace").strip()))
    else:
        stop_server()
        with open(out, "ab") as log_file:
            proc = subprocess.Popen([apiserver_program()], stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=log_file, start_new_session=True, close_fds=True)
        write_atomic(SERVER_PID, "%d\n" % proc.pid)
    url = "https://127.0.0.1:%d" % port
    deadline = time.time() + float(os.environ.get("KLAB_STANDIN_SERVER_WAIT", "60"))
    while True:
        try:
            if api(url, "GET", "/readyz", raw=True, timeout=5).strip() == "ok":
                return
        except (Unreachable, ApiError):
            pass
        if proc is not None and proc.poll() is not None:
            break
        if time.time() > deadline:
            break
        time.sleep(0.2)
    tail = ""
    try:
        with open(out) as f:
            tail = "".join(f.readlines()[-10:])
    except OSError:
        pass
    fail("error execution phase wait-control-plane: the stand-in API server does not answer /readyz on %s "
         "(journalctl -u %s; %s)\n%s" % (url, UNIT, out, tail))


# --- commands -----------------------------------------------------------------------------------

def cmd_version(args):
    if "short" in " ".join(args):
        print(VERSION)
    else:
        print('kubeadm version: &version.Info{Major:"1", GitVersion:"%s", Platform:"linux/amd64"} (klab stand-in)'
              % VERSION)


def cmd_config(args):
    if args[1:3] == ["images", "list"]:
        v = flag(args, "--kubernetes-version") or VERSION
        repo = flag(args, "--image-repository") or "registry.k8s.io"
        for c in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy"):
            print("%s/%s:%s" % (repo, c, v))
        print(("%s/coredns/coredns:v1.12.1" if repo == "registry.k8s.io" else "%s/coredns:v1.12.1") % repo)
        print("%s/pause:3.10.1" % repo)
        print("%s/etcd:3.6.5-0" % repo)
        return
    if args[1:2] == ["validate"]:
        config = flag(args, "--config")
        if not config:
            fail("config validate needs --config")
        load_config(rooted_input(config))
        print("ok")
        return
    fail("unsupported: %s" % " ".join(args), 2)


def upload_certs(args):
    if not os.path.isfile(K + "/admin.conf"):
        fail("upload-certs before init")
    config = keep_config(args, "upload-certs")
    init = load_config(config).get("InitConfiguration") or {}
    key = init.get("certificateKey") or flag(args, "--certificate-key")
    if not key:
        fail("upload-certs needs certificateKey in the InitConfiguration")
    try:
        api(local_server(), "POST", "/klab/v1/upload-certs", {"certificateKey": key})
    except ApiError as e:
        fail("error execution phase upload-certs: %s" % e.message)
    except Unreachable as e:
        fail("error execution phase upload-certs: the API server on %s does not answer: %s" % (e.hostport, e.detail))
    print('[upload-certs] Storing the certificates in Secret "kubeadm-certs" in the "kube-system" Namespace')


def cmd_init(args):
    if args[1:2] == ["phase"]:
        if args[2:3] != ["upload-certs"]:
            fail("unsupported: %s" % " ".join(args), 2)
        return upload_certs(args)
    config = keep_config(args, "init")
    if os.path.exists(K + "/manifests/kube-apiserver.yaml"):
        fail("[preflight] error: %s/manifests/kube-apiserver.yaml already exists" % K)
    need_ca()
    docs = load_config(config)
    if "JoinConfiguration" in docs:
        fail("error: init takes InitConfiguration/ClusterConfiguration, not a JoinConfiguration")
    need_openssl("init")
    init = docs.get("InitConfiguration") or {}
    cluster = docs.get("ClusterConfiguration") or {}
    reg = init.get("nodeRegistration") or {}
    name = reg.get("name") or socket.gethostname().lower()
    endpoint = cluster.get("controlPlaneEndpoint")
    if not endpoint:
        fail("no controlPlaneEndpoint in %s" % config)
    local = init.get("localAPIEndpoint") or {}
    port = int(local.get("bindPort") or DEFAULT_PORT)
    networking = cluster.get("networking") or {}
    print("[init] Using Kubernetes version: %s (klab stand-in)" % (cluster.get("kubernetesVersion") or VERSION))
    print("[certs] Using certificateDir folder \"%s\"" % PKI)
    os.makedirs(PKI + "/etcd", exist_ok=True)
    try:
        svc_ip = str(ipaddress.ip_network(networking.get("serviceSubnet") or "10.96.0.0/12",
                                          strict=False).network_address + 1)
    except ValueError:
        svc_ip = "10.96.0.1"
    sans = ["kubernetes", "kubernetes.default", "kubernetes.default.svc",
            "kubernetes.default.svc." + (networking.get("dnsDomain") or "cluster.local"), name, svc_ip,
            local.get("advertiseAddress") or "127.0.0.1", endpoint.rsplit(":", 1)[0], "127.0.0.1"]
    sans += [str(s) for s in (cluster.get("apiServer") or {}).get("certSANs") or []]
    apiserver_cert(sans)
    for p in ("apiserver-kubelet-client", "apiserver-etcd-client", "front-proxy-ca", "front-proxy-client",
              "etcd/ca", "etcd/server", "etcd/peer", "etcd/healthcheck-client"):
        pem(p, "kubernetes-" + p)
    pem("sa", "service-accounts")
    openssl("pkey", "-in", PKI + "/sa.key", "-pubout", "-out", PKI + "/sa.pub")
    os.remove(PKI + "/sa.crt")
    tokens = [str(t.get("token")) for t in init.get("bootstrapTokens") or [] if t.get("token")]
    if not tokens:
        tokens = ["%s.%s" % ("".join(random.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(6)),
                             "".join(random.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(16)))]
    for t in tokens:
        if not TOKEN_RE.match(t):
            fail('error: bootstrapTokens: Invalid value: "%s": the bootstrap token must be of form '
                 '"[a-z0-9]{6}.[a-z0-9]{16}"' % t)
    print("[kubeconfig] Writing admin.conf, super-admin.conf, kubelet.conf, controller-manager.conf, scheduler.conf")
    kubeconfig(K + "/admin.conf", "kubernetes-admin", endpoint)
    kubeconfig(K + "/super-admin.conf", "kubernetes-super-admin", endpoint)
    kubeconfig(K + "/kubelet.conf", "system:node:" + name, endpoint, token=tokens[0])
    kubeconfig(K + "/controller-manager.conf", "system:kube-controller-manager", endpoint)
    kubeconfig(K + "/scheduler.conf", "system:kube-scheduler", endpoint)
    manifests("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
    write_atomic(TOKENS, "".join(t + "\n" for t in tokens), 0o600)
    now = time.time()
    cert_key = init.get("certificateKey")
    if "--upload-certs" in args and not cert_key:
        cert_key = "%064x" % random.getrandbits(256)
        print("[upload-certs] Using certificate key:\n" + cert_key)
    write_json(CLUSTER_STATE, {
        "createdAt": now,
        "initNode": name,
        "initConfiguration": init,
        "clusterConfiguration": cluster,
        "kubeletConfiguration": docs.get("KubeletConfiguration") or {},
        "uploadedCerts": {"certificateKey": cert_key, "at": now} if "--upload-certs" in args else None,
        "nodes": {},
        "etcdMembers": [{"name": name, "learner": False, "addedAt": now}],
        "controlPlaneJoins": [],
        "refusedControlPlaneJoins": [],
    }, 0o600)
    repo = cluster.get("imageRepository") or "registry.k8s.io"
    write_json(OBJECTS_STATE, {
        "Deployment/kube-system/coredns": {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"},
                         "creationTimestamp": iso(now)},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [
                {"name": "coredns", "image": repo + "/coredns/coredns:v1.12.1"}]}}}},
        "DaemonSet/kube-system/kube-proxy": {
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "kube-proxy", "namespace": "kube-system", "labels": {"k8s-app": "kube-proxy"},
                         "creationTimestamp": iso(now)},
            "spec": {"template": {"spec": {"containers": [
                {"name": "kube-proxy", "image": "%s/kube-proxy:%s" % (repo, VERSION)}]}}}},
    })
    kubelet_files(reg, docs.get("KubeletConfiguration"), networking.get("serviceSubnet"), networking.get("dnsDomain"))
    print("[control-plane] Starting the klab stand-in API server (%s)" % (
        UNIT if under_systemd() else "pid file " + SERVER_PID))
    start_server("init", port)
    print("[addons] Applied essential addon: CoreDNS\n[addons] Applied essential addon: kube-proxy")
    print("Your Kubernetes control-plane has initialized successfully! (klab stand-in)")


def cmd_token(args):
    if not os.path.isfile(K + "/admin.conf"):
        if args[1:2] in (["list"], ["create"]):
            fail("no cluster here")
    open(TOKENS, "a").close()
    sub = args[1] if len(args) > 1 else ""
    if sub == "list":
        with open(TOKENS) as f:
            for t in f:
                if t.strip():
                    print(t.strip())
        return
    if sub == "create":
        t = args[2] if len(args) > 2 and not args[2].startswith("-") else None
        if t is None:
            alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
            t = "%s.%s" % ("".join(random.choice(alphabet) for _ in range(6)),
                           "".join(random.choice(alphabet) for _ in range(16)))
        if not TOKEN_RE.match(t):
            fail("token create needs a token like abcdef.0123456789abcdef")
        with open(TOKENS, "a") as f:
            f.write(t + "\n")
        if "--print-join-command" in args:
            server, _ = kubeconfig_server(K + "/admin.conf")
            with open(PKI + "/ca.crt") as f:
                h = ca_hash(f.read())
            print("kubeadm join %s --token %s --discovery-token-ca-cert-hash %s"
                  % (server.split("://", 1)[-1], t, h))
        else:
            print(t)
        return
    fail("unsupported: %s" % " ".join(args), 2)


def discover(endpoint, token, hashes, unsafe, timeout):
    """kubeadm's bootstrap-token discovery: the cluster CA from cluster-info, the token checked by
    the cluster, the CA pinned by its public key hash. Returns (CA PEM, bootstrap answer)."""
    server = server_url(endpoint)
    print("[discovery] Fetching the cluster CA from https://%s (cluster-info)" % endpoint)
    deadline = time.time() + timeout
    while True:
        try:
            ca = api(server, "GET", "/cluster-info", raw=True)
            break
        except Unreachable as e:
            if time.time() > deadline:
                fail("error execution phase preflight: couldn't validate the identity of the API Server: failed "
                     "to request the cluster-info ConfigMap: Get \"https://%s/cluster-info\": %s"
                     % (endpoint, "connection refused" if e.refused else e.detail))
            time.sleep(2)
        except ApiError as e:
            fail("error execution phase preflight: couldn't validate the identity of the API Server: "
                 "failed to request the cluster-info ConfigMap: %s" % e.message)
    try:
        boot = api(server, "POST", "/klab/v1/bootstrap", {"token": token})
    except ApiError as e:
        if e.status == 401:
            fail('error execution phase preflight: couldn\'t validate the identity of the API Server: could not '
                 'find a JWS signature in the cluster-info ConfigMap for token ID "%s"' % token.split(".")[0])
        fail("error execution phase preflight: %s" % e.message)
    except Unreachable as e:
        fail("error execution phase preflight: %s" % e.detail)
    got = ca_hash(ca)
    if not unsafe and got not in [h.strip().lower() for h in hashes]:
        fail('error execution phase preflight: couldn\'t validate the identity of the API Server: cluster CA '
             'found in cluster-info ConfigMap is invalid: none of the public keys "%s" are pinned' % got)
    print("[discovery] Cluster CA %s is pinned (klab stand-in)" % got)
    return ca, boot


def cmd_join(args):
    config = keep_config(args, "join")
    if os.path.exists(K + "/kubelet.conf"):
        fail("[preflight] error: %s/kubelet.conf already exists" % K)
    docs = load_config(config)
    j = docs.get("JoinConfiguration")
    if j is None:
        fail("error: join needs a JoinConfiguration in %s" % config)
    for other in ("InitConfiguration", "ClusterConfiguration"):
        if other in docs:
            fail("error: join takes a JoinConfiguration, not a %s" % other)
    bt = (j.get("discovery") or {}).get("bootstrapToken")
    if not bt:
        fail("only bootstrap-token discovery is supported (discovery.bootstrapToken)")
    endpoint = bt.get("apiServerEndpoint")
    if not endpoint:
        fail("no discovery.bootstrapToken.apiServerEndpoint in %s" % config)
    hashes = [str(h) for h in bt.get("caCertHashes") or []]
    unsafe = str(bt.get("unsafeSkipCAVerification")).lower() == "true"
    if not hashes and not unsafe:
        fail('error: discovery.bootstrapToken: Invalid value: "": using token-based discovery without '
             'caCertHashes can be unsafe. Set unsafeSkipCAVerification as true in your kubeadm config file '
             'or pass --discovery-token-unsafe-skip-ca-verification flag to continue')
    token = str(bt.get("token"))
    need_openssl("join")
    timeout = parse_duration(str((j.get("timeouts") or {}).get("discovery") or "5m0s")) or 300
    print("[preflight] Running pre-flight checks")
    ca, boot = discover(endpoint, token, hashes, unsafe, timeout)
    reg = j.get("nodeRegistration") or {}
    name = reg.get("name") or socket.gethostname().lower()
    os.makedirs(PKI + "/etcd", exist_ok=True)
    write_atomic(PKI + "/ca.crt", ca)
    pem("apiserver-kubelet-client", "kubelet-client")
    cp = j.get("controlPlane")
    if cp is not None:
        print("[control-plane-prepare] Downloading the certificates in Secret \"kubeadm-certs\" (klab stand-in)")
        for p in ("apiserver", "apiserver-etcd-client", "front-proxy-ca", "front-proxy-client", "etcd/ca",
                  "etcd/server", "etcd/peer"):
            pem(p, "kubernetes-" + p)
        kubeconfig(K + "/admin.conf", "kubernetes-admin", endpoint)
        manifests("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
    kubeconfig(K + "/kubelet.conf", "system:node:" + name, endpoint, token=token)
    networking = boot.get("networking") or {}
    kubelet_files(reg, boot.get("kubeletConfiguration"), networking.get("serviceSubnet"),
                  networking.get("dnsDomain"))
    if cp is not None:
        server = server_url(endpoint)
        body = {"node": name, "certificateKey": cp.get("certificateKey")}
        if "taints" in reg:
            body["taints"] = reg.get("taints") or []
        print("[control-plane-join] Adding this node to etcd as a learner (klab stand-in)")
        try:
            api(server, "POST", "/klab/v1/etcd/join-start", body, token=token)
        except ApiError as e:
            if e.status == 409:
                fail("error execution phase control-plane-join/etcd-join: error creating local etcd static pod "
                     "manifest file: %s" % e.message)
            fail("error execution phase control-plane-prepare/download-certs: error downloading certs: %s" % e.message)
        except Unreachable as e:
            fail("error execution phase control-plane-join/etcd-join: %s" % e.detail)
        port = int(((cp.get("localAPIEndpoint") or {}).get("bindPort")) or DEFAULT_PORT)
        start_server("member", port)
        # etcd syncs the new member while it is a learner: a few seconds in which another control
        # plane's join is refused (the window klab must not overlap).
        time.sleep(float(os.environ.get("KLAB_STANDIN_LEARNER_SECONDS", "3")))
        try:
            api(server, "POST", "/klab/v1/etcd/join-end", {"node": name}, token=token)
        except (ApiError, Unreachable) as e:
            fail("error execution phase control-plane-join/etcd-join: promoting the learner: %s" % e)
        print("[mark-control-plane] Marking the node %s as control-plane" % name)
        print("This node has joined the cluster and a new control plane instance was created (klab stand-in)")
    else:
        print("This node has joined the cluster (klab stand-in)")


def cmd_reset(args):
    conf = read_json(SERVER_CONF, {}) or {}
    if conf.get("role") == "member" and os.path.isfile(K + "/kubelet.conf"):
        try:
            server, token = kubeconfig_server(K + "/kubelet.conf")
            name = socket.gethostname().lower()
            flags = open(FLAGS_ENV).read() if os.path.exists(FLAGS_ENV) else ""
            m = re.search(r"--hostname-override=(\S+?)\"?(\s|$)", flags)
            if m:
                name = m.group(1)
            api(server_url(server), "POST", "/klab/v1/etcd/remove", {"node": name}, token=token, timeout=5)
            print("[reset] Removed this node's etcd member (klab stand-in)")
        except Exception as e:  # noqa: BLE001 — reset goes on, as kubeadm's does
            print("[reset] could not remove this node's etcd member: %s" % e)
    stop_server()
    if under_systemd():
        run(["systemctl", "stop", "kubelet"])
    for p in [K + "/manifests", PKI] + [K + "/" + f for f in (os.listdir(K) if os.path.isdir(K) else [])
                                        if f.endswith(".conf")]:
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.exists(p):
            os.remove(p)
    for f in (TOKENS, CLUSTER_STATE, OBJECTS_STATE, SERVER_CONF, FLAGS_ENV, KUBELET_DIR + "/config.yaml"):
        if os.path.exists(f):
            os.remove(f)
    print("[reset] stand-in: removed %s, the kubelet's files and the stand-in cluster state" % K)


def main():
    args = sys.argv[1:]
    record("kubeadm", args)
    cmd = args[0] if args else ""
    handlers = {"version": cmd_version, "config": cmd_config, "init": cmd_init, "token": cmd_token,
                "join": cmd_join, "reset": cmd_reset}
    if cmd not in handlers:
        fail("unsupported: %s" % " ".join(args), 2)
    handlers[cmd](args)


main()
