// Command vncd-testcluster is a multi-call test kit for vncd: it runs a real upstream
// kube-apiserver (k8s.io/kubernetes) on top of an embedded etcd, all on 127.0.0.1, and
// it also is kubectl (k8s.io/kubectl) when invoked under that name.
//
// Usage:
//
//	vncd-testcluster serve --dir DIR       run etcd + kube-apiserver in the foreground
//	vncd-testcluster kubectl ARGS...       kubectl (also when argv[0] is "kubectl")
//	vncd-testcluster kube-apiserver FLAGS  the bare kube-apiserver command
//	vncd-testcluster user-kubeconfig --dir DIR --user NAME [--group G]... --out FILE
//	                                       mint a client certificate for another identity
//
// helm is built as a separate binary from helm.sh/helm/v3/cmd/helm (see scripts/testcluster).
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"

	// Client auth plugins for kubectl, JSON log format and client-go metrics for the apiserver.
	_ "k8s.io/client-go/plugin/pkg/client/auth"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	_ "time/tzdata"
)

func usage() {
	fmt.Fprintf(os.Stderr, `usage:
  %[1]s serve --dir DIR
  %[1]s kubectl ARGS...
  %[1]s kube-apiserver FLAGS...
  %[1]s user-kubeconfig --dir DIR --user NAME [--group GROUP]... --out FILE
`, filepath.Base(os.Args[0]))
}

func main() {
	name := strings.TrimSuffix(filepath.Base(os.Args[0]), ".exe")
	args := os.Args[1:]
	switch name {
	case "kubectl", "kube-apiserver":
	default:
		if len(args) == 0 {
			usage()
			os.Exit(2)
		}
		name, args = args[0], args[1:]
	}

	switch name {
	case "kubectl":
		os.Exit(runKubectl(args))
	case "kube-apiserver":
		os.Exit(runBareAPIServer(args))
	case "serve":
		if err := runServe(args); err != nil {
			fmt.Fprintf(os.Stderr, "vncd-testcluster serve: %v\n", err)
			os.Exit(1)
		}
	case "user-kubeconfig":
		if err := runUserKubeconfig(args); err != nil {
			fmt.Fprintf(os.Stderr, "vncd-testcluster user-kubeconfig: %v\n", err)
			os.Exit(1)
		}
	case "-h", "--help", "help":
		usage()
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n", name)
		usage()
		os.Exit(2)
	}
}

// runKubectl runs upstream kubectl with args (without the program name).
func runKubectl(args []string) int {
	// kubectl reads os.Args for plugin lookup and for its early -v parsing.
	os.Args = append([]string{"kubectl"}, args...)
	logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) //nolint:errcheck
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err) // prints and exits non-zero
	}
	return 0
}
