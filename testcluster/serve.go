package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	apiserverapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
)

const (
	clusterName      = "vncd-testcluster"
	serviceCIDR      = "10.0.0.0/24"
	saIssuer         = "https://kubernetes.default.svc.cluster.local"
	readyTimeout     = 180 * time.Second
	etcdReadyTimeout = 60 * time.Second
)

// ports are the loopback ports a cluster uses. They are kept in DIR/ports.json and reused
// on the next `up` of the same DIR when still free (etcd remembers its peer URL).
type ports struct {
	EtcdClient int `json:"etcd_client"`
	EtcdPeer   int `json:"etcd_peer"`
	APIServer  int `json:"apiserver"`
}

// readyInfo is written to DIR/ready once /healthz and /readyz are ok and the default
// namespace exists. scripts/testcluster waits for this file.
type readyInfo struct {
	PID        int    `json:"pid"`
	Server     string `json:"server"`
	Etcd       string `json:"etcd"`
	Kubeconfig string `json:"kubeconfig"`
	ReadyAfter string `json:"ready_after"`
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func portFree(p int) bool {
	if p <= 0 {
		return false
	}
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
	if err != nil {
		return false
	}
	l.Close()
	return true
}

func loadPorts(path string) (ports, error) {
	var ps ports
	if data, err := os.ReadFile(path); err == nil {
		_ = json.Unmarshal(data, &ps)
	}
	used := map[int]bool{}
	for _, p := range []*int{&ps.EtcdClient, &ps.EtcdPeer, &ps.APIServer} {
		if portFree(*p) && !used[*p] {
			used[*p] = true
			continue
		}
		for {
			n, err := freePort()
			if err != nil {
				return ps, err
			}
			if !used[n] {
				*p = n
				used[n] = true
				break
			}
		}
	}
	data, _ := json.MarshalIndent(ps, "", "  ")
	return ps, writeFileAtomic(path, append(data, '\n'), 0o644)
}

func runServe(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	dirFlag := fs.String("dir", "", "cluster directory (etcd data, pki, kubeconfig, logs)")
	verbosity := fs.Int("v", 0, "kube-apiserver log verbosity")
	var extra multiFlag
	fs.Var(&extra, "apiserver-arg", "extra kube-apiserver flag (repeatable), e.g. --apiserver-arg=--feature-gates=X=true")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dirFlag == "" {
		return errors.New("--dir is required")
	}
	dir, err := filepath.Abs(*dirFlag)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	start := time.Now()
	readyPath := filepath.Join(dir, "ready")
	_ = os.Remove(readyPath)

	keys := pki{dir: filepath.Join(dir, "pki")}
	if err := keys.ensure(); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	ps, err := loadPorts(filepath.Join(dir, "ports.json"))
	if err != nil {
		return fmt.Errorf("ports: %w", err)
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", ps.APIServer)
	kubeconfigPath := filepath.Join(dir, "kubeconfig")
	if err := writeAdminKubeconfig(kubeconfigPath, server, keys); err != nil {
		return fmt.Errorf("kubeconfig: %w", err)
	}

	// --- embedded etcd ---
	etcdURL := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", ps.EtcdClient)}
	peerURL := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", ps.EtcdPeer)}
	cfg := embed.NewConfig()
	cfg.Name = clusterName
	cfg.Dir = filepath.Join(dir, "etcd")
	cfg.ListenClientUrls = []url.URL{etcdURL}
	cfg.AdvertiseClientUrls = []url.URL{etcdURL}
	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.ListenMetricsUrls = nil
	cfg.UnsafeNoFsync = true // test data only
	cfg.LogLevel = "warn"
	cfg.LogOutputs = []string{filepath.Join(dir, "etcd.log")}
	etcd, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("start etcd: %w", err)
	}
	defer etcd.Close()
	select {
	case <-etcd.Server.ReadyNotify():
	case err := <-etcd.Err():
		return fmt.Errorf("etcd: %w", err)
	case <-time.After(etcdReadyTimeout):
		return errors.New("etcd did not become ready in time")
	}
	fmt.Fprintf(os.Stderr, "vncd-testcluster: etcd ready at %s after %s\n", etcdURL.String(), time.Since(start).Round(time.Millisecond))

	// --- kube-apiserver (upstream command, in process) ---
	apiArgs := []string{
		"--etcd-servers=" + etcdURL.String(),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(ps.APIServer),
		"--cert-dir=" + keys.dir,
		"--tls-cert-file=" + keys.ServingCert(),
		"--tls-private-key-file=" + keys.ServingKey(),
		"--client-ca-file=" + keys.CACert(),
		"--token-auth-file=" + keys.TokenFile(),
		"--authorization-mode=RBAC",
		"--service-account-issuer=" + saIssuer,
		"--service-account-key-file=" + keys.SAPub(),
		"--service-account-signing-key-file=" + keys.SAKey(),
		"--service-cluster-ip-range=" + serviceCIDR,
		// No controller-manager creates the "default" ServiceAccount, so this admission
		// plugin would reject every pod; envtest disables it for the same reason.
		"--disable-admission-plugins=ServiceAccount",
		// The master-lease endpoint reconciler would try to publish 127.0.0.1 as the
		// endpoint of the kubernetes Service, which validation rejects (loopback).
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		"--profiling=false",
		"--v=" + strconv.Itoa(*verbosity),
	}
	apiArgs = append(apiArgs, extra...)
	cmd := apiserverapp.NewAPIServerCommand() // installs the SIGTERM/SIGINT handler
	cmd.SetArgs(apiArgs)
	ctx := cmd.Context()
	apiDone := make(chan error, 1)
	go func() { apiDone <- cmd.Execute() }()

	// --- readiness ---
	readyErr := make(chan error, 1)
	go func() {
		readyErr <- waitReady(ctx, server, keys, start, readyPath, kubeconfigPath, etcdURL.String())
	}()

	for {
		select {
		case err := <-apiDone:
			if ctx.Err() != nil {
				fmt.Fprintln(os.Stderr, "vncd-testcluster: apiserver stopped on signal; stopping etcd")
				_ = os.Remove(readyPath)
				return nil
			}
			_ = os.Remove(readyPath)
			if err == nil {
				err = errors.New("exited unexpectedly")
			}
			return fmt.Errorf("kube-apiserver: %w", err)
		case err := <-etcd.Err():
			_ = os.Remove(readyPath)
			return fmt.Errorf("etcd: %w", err)
		case err := <-readyErr:
			readyErr = nil
			if err != nil {
				return err
			}
		}
	}
}

func adminRESTConfig(server string, keys pki) *rest.Config {
	return &rest.Config{
		Host: server,
		TLSClientConfig: rest.TLSClientConfig{
			CAFile:   keys.CACert(),
			CertFile: keys.AdminCert(),
			KeyFile:  keys.AdminKey(),
		},
		Timeout: 5 * time.Second,
	}
}

func waitReady(ctx context.Context, server string, keys pki, start time.Time, readyPath, kubeconfigPath, etcdURL string) error {
	cs, err := kubernetes.NewForConfig(adminRESTConfig(server, keys))
	if err != nil {
		return err
	}
	deadline := time.Now().Add(readyTimeout)
	var last string
	for {
		if ctx.Err() != nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("apiserver not ready after %s: %s", readyTimeout, last)
		}
		ok := true
		for _, path := range []string{"/healthz", "/readyz"} {
			body, err := cs.Discovery().RESTClient().Get().AbsPath(path).DoRaw(ctx)
			if err != nil || strings.TrimSpace(string(body)) != "ok" {
				ok = false
				last = fmt.Sprintf("%s: %v %s", path, err, strings.TrimSpace(string(body)))
				break
			}
		}
		if ok {
			if _, err := cs.CoreV1().Namespaces().Get(ctx, "default", metav1.GetOptions{}); err != nil {
				ok = false
				last = fmt.Sprintf("namespace default: %v", err)
			}
		}
		if ok {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	info := readyInfo{
		PID:        os.Getpid(),
		Server:     server,
		Etcd:       etcdURL,
		Kubeconfig: kubeconfigPath,
		ReadyAfter: time.Since(start).Round(time.Millisecond).String(),
	}
	data, _ := json.MarshalIndent(info, "", "  ")
	if err := writeFileAtomic(readyPath, append(data, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "vncd-testcluster: ready at %s after %s\n", server, info.ReadyAfter)
	return nil
}

// writeAdminKubeconfig writes a self-contained kubeconfig: the default context uses the
// admin client certificate (group system:masters); the context "<name>-token" uses the
// static bearer token of the same user.
func writeAdminKubeconfig(path, server string, keys pki) error {
	ca, err := os.ReadFile(keys.CACert())
	if err != nil {
		return err
	}
	crt, err := os.ReadFile(keys.AdminCert())
	if err != nil {
		return err
	}
	key, err := os.ReadFile(keys.AdminKey())
	if err != nil {
		return err
	}
	tok, err := os.ReadFile(keys.AdminToken())
	if err != nil {
		return err
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[clusterName] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: crt, ClientKeyData: key}
	cfg.AuthInfos["admin-token"] = &clientcmdapi.AuthInfo{Token: strings.TrimSpace(string(tok))}
	cfg.Contexts[clusterName] = &clientcmdapi.Context{Cluster: clusterName, AuthInfo: "admin", Namespace: "default"}
	cfg.Contexts[clusterName+"-token"] = &clientcmdapi.Context{Cluster: clusterName, AuthInfo: "admin-token", Namespace: "default"}
	cfg.CurrentContext = clusterName
	return writeKubeconfig(path, cfg)
}

func writeKubeconfig(path string, cfg *clientcmdapi.Config) error {
	data, err := clientcmd.Write(*cfg)
	if err != nil {
		return err
	}
	return writeFileAtomic(path, data, 0o600)
}

// runUserKubeconfig mints a client certificate for an arbitrary identity, signed by the
// cluster CA, and writes a kubeconfig for it. With no RBAC bindings the identity can do
// nothing, which is what least-privilege tests want to start from.
func runUserKubeconfig(args []string) error {
	fs := flag.NewFlagSet("user-kubeconfig", flag.ContinueOnError)
	dirFlag := fs.String("dir", "", "cluster directory")
	user := fs.String("user", "", "user name (certificate CN)")
	out := fs.String("out", "", "kubeconfig to write")
	var groups multiFlag
	fs.Var(&groups, "group", "group (certificate O), repeatable")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dirFlag == "" || *user == "" || *out == "" {
		return errors.New("--dir, --user and --out are required")
	}
	keys := pki{dir: filepath.Join(*dirFlag, "pki")}
	admin, err := clientcmd.LoadFromFile(filepath.Join(*dirFlag, "kubeconfig"))
	if err != nil {
		return err
	}
	cluster := admin.Clusters[clusterName]
	if cluster == nil {
		return errors.New("admin kubeconfig has no cluster " + clusterName)
	}
	caCert, caKey, err := keys.loadCA()
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "vncd-testcluster-user")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	crtPath, keyPath := filepath.Join(tmp, "c.crt"), filepath.Join(tmp, "c.key")
	if err := keys.issueClient(*user, groups, caCert, caKey, crtPath, keyPath); err != nil {
		return err
	}
	crt, err := os.ReadFile(crtPath)
	if err != nil {
		return err
	}
	key, err := os.ReadFile(keyPath)
	if err != nil {
		return err
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[clusterName] = cluster
	cfg.AuthInfos[*user] = &clientcmdapi.AuthInfo{ClientCertificateData: crt, ClientKeyData: key}
	cfg.Contexts[clusterName] = &clientcmdapi.Context{Cluster: clusterName, AuthInfo: *user, Namespace: "default"}
	cfg.CurrentContext = clusterName
	return writeKubeconfig(*out, cfg)
}

// runBareAPIServer runs the upstream kube-apiserver command with the given flags.
func runBareAPIServer(args []string) int {
	cmd := apiserverapp.NewAPIServerCommand()
	cmd.SetArgs(args)
	if err := cmd.Execute(); err != nil {
		return 1
	}
	return 0
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }
