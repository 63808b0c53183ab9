// Command kubelet-streaming is the process kubelet's streaming server: exec, attach and
// port-forward, served on the kubelet port the Node advertises, with the paths and errors of
// k8s.io/kubernetes/pkg/kubelet/server/server.go. The streams themselves (SPDY/3.1 and the
// WebSocket channel protocols) are upstream's, from k8s.io/cri-streaming, the library the
// kubelet and the CRI runtimes use. Every other path (containerLogs, healthz) is proxied to
// the Python kubelet's plain-HTTP loopback server, which also tells us a container's pid,
// environment and state (see runtime.go).
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"time"

	"k8s.io/cri-streaming/pkg/streaming"
	"k8s.io/cri-streaming/pkg/streaming/portforward"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
)

// The kubelet's defaults (--streaming-connection-idle-timeout, DefaultStreamCreationTimeout).
const (
	idleTimeout     = 4 * time.Hour
	creationTimeout = remotecommand.DefaultStreamCreationTimeout
)

func main() {
	listen := flag.String("listen", "", "host:port to serve TLS on (the Node's kubelet port)")
	cert := flag.String("cert", "", "TLS certificate file")
	key := flag.String("key", "", "TLS key file")
	backend := flag.String("backend", "", "URL of the Python kubelet's loopback HTTP server")
	flag.Parse()
	if *listen == "" || *cert == "" || *key == "" || *backend == "" {
		fmt.Fprintln(os.Stderr, "usage: kubelet-streaming --listen HOST:PORT --cert FILE --key FILE --backend URL")
		os.Exit(2)
	}
	target, err := url.Parse(*backend)
	if err != nil {
		log.Fatalf("kubelet-streaming: bad --backend %q: %v", *backend, err)
	}
	pair, err := tls.LoadX509KeyPair(*cert, *key)
	if err != nil {
		log.Fatalf("kubelet-streaming: %v", err)
	}
	facts := &factsClient{base: target, token: os.Getenv("K8S_TESTENV_STREAMING_TOKEN")}
	server := &http.Server{
		Addr:      *listen,
		Handler:   newMux(facts, target),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{pair}, NextProtos: []string{"http/1.1"}},
		// upgrades need HTTP/1.1 (a non-nil empty map turns HTTP/2 off)
		TLSNextProto:      map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ReadHeaderTimeout: 30 * time.Second,
	}
	log.Printf("kubelet-streaming: serving on %s, proxying other paths to %s", *listen, target)
	log.Fatal(server.ListenAndServeTLS("", ""))
}

// logged records each streaming request in the kubelet's log, with its protocol.
func logged(serve func(http.ResponseWriter, *http.Request, *factsClient), facts *factsClient) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		log.Printf("kubelet-streaming: %s %s (upgrade: %s %s)", r.Method, r.URL.Path,
			r.Header.Get("Upgrade"), r.Header.Values("Sec-Websocket-Protocol"))
		serve(w, r, facts)
	}
}

func newMux(facts *factsClient, backend *url.URL) *http.ServeMux {
	mux := http.NewServeMux()
	for _, prefix := range []string{"/exec/{ns}/{pod}", "/exec/{ns}/{pod}/{uid}"} {
		mux.HandleFunc(prefix+"/{container}", logged(serveExec, facts))
	}
	for _, prefix := range []string{"/attach/{ns}/{pod}", "/attach/{ns}/{pod}/{uid}"} {
		mux.HandleFunc(prefix+"/{container}", logged(serveAttach, facts))
	}
	for _, path := range []string{"/portForward/{ns}/{pod}", "/portForward/{ns}/{pod}/{uid}"} {
		mux.HandleFunc(path, logged(servePortForward, facts))
	}
	proxy := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(backend)
			r.Out.Header.Del("Authorization")
		},
		FlushInterval: -1, // containerLogs?follow=true streams
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, factsPrefix) { // internal to the kubelet
			http.NotFound(w, r)
			return
		}
		proxy.ServeHTTP(w, r)
	})
	return mux
}

// lookup resolves the pod of a request, answering as the kubelet does when it is unknown.
func lookup(w http.ResponseWriter, r *http.Request, facts *factsClient) (*podFacts, bool) {
	pod, err := facts.pod(r.PathValue("ns"), r.PathValue("pod"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return nil, false
	}
	uid := r.PathValue("uid")
	if pod == nil || (uid != "" && uid != pod.UID) {
		http.Error(w, "pod does not exist", http.StatusNotFound)
		return nil, false
	}
	return pod, true
}

// remoteCommand resolves an exec or attach request to its stream options and a running
// container, or answers it with the error notFound (the kubelet's message) spells.
func remoteCommand(w http.ResponseWriter, r *http.Request, facts *factsClient,
	notFound func(pod *podFacts, name string) error) (*remotecommand.Options, *containerRuntime, bool) {
	opts, err := remotecommand.NewOptions(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return nil, nil, false
	}
	pod, ok := lookup(w, r, facts)
	if !ok {
		return nil, nil, false
	}
	name := r.PathValue("container")
	container := pod.Containers[name]
	if container == nil || !container.Running { // the kubelet finds running containers only
		_ = streaming.WriteError(notFound(pod, name), w)
		return nil, nil, false
	}
	return opts, &containerRuntime{facts: facts, pod: pod, container: container}, true
}

func serveExec(w http.ResponseWriter, r *http.Request, facts *factsClient) {
	opts, runtime, ok := remoteCommand(w, r, facts, func(pod *podFacts, name string) error {
		return fmt.Errorf("container not found (%q)", name) // kubelet_pods.go GetExec
	})
	if !ok {
		return
	}
	pod, name := runtime.pod, runtime.container.Name
	cmd := r.URL.Query()["command"]
	remotecommand.ServeExec(w, r, runtime, pod.FullName, pod.UID, name, cmd, opts,
		idleTimeout, creationTimeout, remotecommand.SupportedStreamingProtocols)
}

func serveAttach(w http.ResponseWriter, r *http.Request, facts *factsClient) {
	opts, runtime, ok := remoteCommand(w, r, facts, func(pod *podFacts, name string) error {
		return fmt.Errorf("container %s not found in pod %s", name, pod.FullName) // GetAttach
	})
	if !ok {
		return
	}
	pod, name := runtime.pod, runtime.container.Name
	remotecommand.ServeAttach(w, r, runtime, pod.FullName, pod.UID, name, opts,
		idleTimeout, creationTimeout, remotecommand.SupportedStreamingProtocols)
}

func servePortForward(w http.ResponseWriter, r *http.Request, facts *factsClient) {
	opts, err := portforward.NewV4Options(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	pod, ok := lookup(w, r, facts)
	if !ok {
		return
	}
	if !pod.anyRunning() {
		// kubelet_pods.go GetPortForward: the runtime lists running pods only
		_ = streaming.WriteError(fmt.Errorf("pod not found (%q)", pod.FullName), w)
		return
	}
	runtime := &containerRuntime{facts: facts, pod: pod}
	// a CRI runtime names the pod sandbox here; ours is the pod's UID
	portforward.ServePortForward(w, r, runtime, pod.UID, "", opts,
		idleTimeout, creationTimeout, portforward.SupportedProtocols)
}
