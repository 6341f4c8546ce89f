# kubelet (stand-in): under systemd (kubelet.service) it idles until kubeadm has written
# /etc/kubernetes/kubelet.conf, then registers the node with the stand-in API server and posts its
# status every 2 s: its name, its InternalIP and every IPv4 address of the node (`ip -o -4 addr`,
# which calico-node's simulated autodetection works on).
#
# InternalIP is what a real kubelet takes: --node-ip when given (it must be one of the node's
# addresses, or the kubelet refuses to start), otherwise the first address of the interface that
# holds the default route. Its flags come from its command line, which systemd builds from the
# kubeadm drop-in ($KUBELET_KUBEADM_ARGS from /var/lib/kubelet/kubeadm-flags.env): a kubelet that
# was not restarted after kubeadm wrote the file does not see a new node-ip, as in reality.
#
#   kubelet --klab-standin-register-once   one registration now (tests): the flags are read from
#                                          kubeadm-flags.env, as systemd would pass them
# Test-only environment: KLAB_STANDIN_IP_ADDR_FILE (text in place of `ip -o -4 addr show`),
# KLAB_STANDIN_IP_ROUTE_FILE (text in place of `ip -4 route show default`).

import platform
import shlex
import socket

PROG = "kubelet"
INTERVAL = 2.0


def flags(args):
    """--name=value / --name value → {name: value}."""
    out = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            out[k] = v
        elif a.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[a[2:]] = args[i + 1]
            i += 1
        elif a.startswith("--"):
            out[a[2:]] = "true"
        i += 1
    return out


def kubeadm_flags():
    """The words of KUBELET_KUBEADM_ARGS in kubeadm-flags.env (what systemd expands)."""
    try:
        with open(FLAGS_ENV) as f:
            text = f.read()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("KUBELET_KUBEADM_ARGS="):
            # systemd splits the unquoted $KUBELET_KUBEADM_ARGS on whitespace
            return " ".join(shlex.split(line[len("KUBELET_KUBEADM_ARGS="):])).split()
    return []


def command_text(env, cmd):
    path = os.environ.get(env)
    if path:
        with open(path) as f:
            return f.read()
    rc, out, err = run(cmd)
    if rc != 0:
        raise RuntimeError("%s: %s" % (" ".join(cmd), err.decode(errors="replace").strip()))
    return out.decode()


def addresses():
    """[{ifindex, ifname, address, prefix}] in the order `ip -o -4 addr show` lists them."""
    out = []
    for line in command_text("KLAB_STANDIN_IP_ADDR_FILE", ["ip", "-o", "-4", "addr", "show"]).splitlines():
        m = re.match(r"^\s*(\d+):\s+(\S+)\s+inet\s+(\d+\.\d+\.\d+\.\d+)/(\d+)", line)
        if m:
            out.append({"ifindex": int(m.group(1)), "ifname": m.group(2).split("@")[0],
                        "address": m.group(3), "prefix": int(m.group(4))})
    return out


def default_dev():
    text = command_text("KLAB_STANDIN_IP_ROUTE_FILE", ["ip", "-4", "route", "show", "default"])
    m = re.search(r"\bdev\s+(\S+)", text)
    return m.group(1) if m else None


def os_image():
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "Unknown"


def runtime_version():
    rc, out, _ = run(["containerd", "--version"])
    if rc == 0:
        m = re.search(r"\s(v?\d+\.\d+\.\d+\S*)", out.decode())
        if m:
            return "containerd://" + m.group(1).lstrip("v")
    return "containerd://unknown"


class Kubelet:
    def __init__(self, args):
        self.f = flags(args)
        self.kubeconfig = rooted(self.f.get("kubeconfig") or KUBELET_CONF)
        self.name = (self.f.get("hostname-override") or socket.gethostname()).lower()
        self.registered = False
        self.last = None
        self.info = None

    def say(self, msg):
        if msg != self.last:
            sys.stderr.write("kubelet (stand-in): %s\n" % msg)
            sys.stderr.flush()
            self.last = msg

    def status(self):
        addrs = addresses()
        node_ip = self.f.get("node-ip")
        if node_ip:
            if not any(a["address"] == node_ip for a in addrs):
                raise RuntimeError('failed to validate nodeIP: node IP: "%s" not found in the host\'s network '
                                   'interfaces' % node_ip)
            internal = node_ip
        else:
            dev = default_dev()
            cands = [a for a in addrs if a["ifname"] == dev] or [a for a in addrs if a["ifname"] != "lo"]
            if not cands:
                raise RuntimeError("no IPv4 address to report as the node's InternalIP")
            internal = cands[0]["address"]
        if self.info is None:  # what a kubelet learns once at start
            self.info = {"kubeletVersion": VERSION, "osImage": os_image(), "kernelVersion": platform.release(),
                         "containerRuntimeVersion": runtime_version()}
        return dict(self.info, name=self.name, internalIP=internal, addresses=addrs)

    def sync(self, create):
        """One registration (create) or status update. Returns the Node or raises."""
        if not os.path.isfile(self.kubeconfig):
            raise FileNotFoundError("waiting for %s (kubeadm init/join writes it)" % self.kubeconfig)
        server, token = kubeconfig_server(self.kubeconfig)
        server = server_url(server)
        body = self.status()
        body["create"] = create
        return api(server, "POST", "/klab/v1/nodes", body, token=token)

    def loop(self):
        self.say("klab stand-in kubelet %s, node %s" % (VERSION, self.name))
        while True:
            try:
                node = self.sync(create=not self.registered)
                if not self.registered:
                    self.registered = True
                    self.say("Successfully registered node %s (InternalIP %s)" % (
                        self.name, node["status"]["addresses"][0]["address"]))
                else:
                    self.say("posting node status of %s" % self.name)
            except FileNotFoundError as e:
                self.registered = False
                self.say(str(e))
            except ApiError as e:
                if e.status == 404 and self.registered:
                    self.say('Error updating node status: nodes "%s" not found (deleted; a restart '
                             'registers it again)' % self.name)
                else:
                    self.say("Unable to register node with API server: %s" % e.message)
            except Unreachable as e:
                self.say('Unable to register node with API server: Post "https://%s/api/v1/nodes": %s'
                         % (e.hostport, "connection refused" if e.refused else e.detail))
            except Exception as e:  # noqa: BLE001 — a kubelet keeps trying
                self.say("node status: %s" % e)
            time.sleep(INTERVAL)


def main():
    args = sys.argv[1:]
    record("kubelet", args)
    if args[:1] in (["--version"], ["version"]):
        print("Kubernetes %s" % VERSION)
        return 0
    if "--klab-standin-register-once" in args:
        k = Kubelet([a for a in args if a != "--klab-standin-register-once"] + kubeadm_flags())
        try:
            node = k.sync(create=True)
        except (ApiError, Unreachable, OSError, RuntimeError) as e:
            die("kubelet (stand-in): registering %s: %s" % (k.name, getattr(e, "message", None) or e))
        ip = node["status"]["addresses"][0]["address"]
        print("kubelet (stand-in): registered node %s (InternalIP %s)" % (k.name, ip))
        return 0
    # Under systemd (kubelet.service) run like a kubelet; from a shell, return.
    if os.environ.get("INVOCATION_ID"):
        Kubelet(args).loop()
    return 0


sys.exit(main())
