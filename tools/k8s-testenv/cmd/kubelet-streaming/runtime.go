package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"
)

// factsPrefix is the Python kubelet's internal endpoint: GET factsPrefix+"{ns}/{pod}".
const factsPrefix = "/runtime/"

// A command's pipes may be held open by a background child after it exits; give up on
// them after this long, as a container runtime's exec does when the process is gone.
const ioDrainTimeout = 10 * time.Second

// podFacts is what the Python kubelet knows about a pod (JSON from its facts endpoint).
type podFacts struct {
	UID       string `json:"uid"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	FullName  string `json:"fullName"` // name_namespace, as kubelet messages spell a pod
	PodIP     string `json:"podIP"`
	// Namespaces: containers run in their own mount and UTS namespaces (false when the
	// kernel refused them; exec then runs on the host like the container itself).
	Namespaces bool                       `json:"namespaces"`
	Containers map[string]*containerFacts `json:"containers"`
}

type containerFacts struct {
	Name       string            `json:"name"`
	Running    bool              `json:"running"`
	Pid        int               `json:"pid"`
	Env        map[string]string `json:"env"`
	WorkingDir string            `json:"workingDir"`
	TTY        bool              `json:"tty"`
	Stdin      bool              `json:"stdin"`
	StdinPath  string            `json:"stdinPath"` // a FIFO the container reads (stdin: true)
	LogPath    string            `json:"logPath"`
}

func (p *podFacts) anyRunning() bool {
	for _, c := range p.Containers {
		if c.Running {
			return true
		}
	}
	return false
}

var factsHTTP = &http.Client{Timeout: 10 * time.Second}

type factsClient struct {
	base  *url.URL
	token string
}

// pod returns the facts of a pod, or nil when the kubelet does not run it.
func (f *factsClient) pod(namespace, name string) (*podFacts, error) {
	u := f.base.JoinPath(factsPrefix, namespace, name)
	req, err := http.NewRequest(http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+f.token)
	resp, err := factsHTTP.Do(req)
	if err != nil {
		return nil, fmt.Errorf("asking the kubelet about %s/%s: %w", namespace, name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return nil, nil
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		return nil, fmt.Errorf("asking the kubelet about %s/%s: %s: %s", namespace, name, resp.Status, body)
	}
	var facts podFacts
	if err := json.NewDecoder(resp.Body).Decode(&facts); err != nil {
		return nil, err
	}
	return &facts, nil
}

// containerRuntime implements remotecommand.Executor, remotecommand.Attacher and
// portforward.PortForwarder for one request.
type containerRuntime struct {
	facts     *factsClient
	pod       *podFacts
	container *containerFacts
}

// command builds the argv that runs cmd inside the container: nsenter into the namespaces
// of its main process (so its /etc/hosts, hostname and mounts apply), then cd to its
// working directory there (a working directory under a mount only exists inside).
func (rt *containerRuntime) command(cmd []string) (*exec.Cmd, error) {
	if len(cmd) == 0 {
		return nil, errors.New("no command given")
	}
	c := rt.container
	if !strings.Contains(cmd[0], "/") && !rt.onPath(cmd[0]) {
		return nil, fmt.Errorf("exec: %q: executable file not found in $PATH", cmd[0]) // runc's words
	}
	argv := []string{"/bin/sh", "-c", `cd "$1" && shift && exec "$@"`, "sh", c.WorkingDir}
	argv = append(argv, cmd...)
	if rt.pod.Namespaces {
		nsenter, err := exec.LookPath("nsenter")
		if err != nil {
			return nil, err
		}
		argv = append([]string{nsenter, "--target", strconv.Itoa(c.Pid), "--mount", "--uts", "--"}, argv...)
	}
	proc := exec.Command(argv[0], argv[1:]...)
	// its own group, so it can be killed with the container; and never outlive this helper
	proc.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	proc.Env = make([]string, 0, len(c.Env)+1)
	for k, v := range c.Env {
		proc.Env = append(proc.Env, k+"="+v)
	}
	return proc, nil
}

// onPath tells whether the container's PATH has an executable called name, looking through
// /proc/<pid>/root (the container's mounts) when it has its own mount namespace.
func (rt *containerRuntime) onPath(name string) bool {
	root := "/"
	if rt.pod.Namespaces {
		inside := "/proc/" + strconv.Itoa(rt.container.Pid) + "/root"
		if _, err := os.Stat(inside); err == nil {
			root = inside
		}
	}
	for _, dir := range filepath.SplitList(rt.container.Env["PATH"]) {
		info, err := os.Stat(filepath.Join(root, dir, name))
		if err == nil && !info.IsDir() && info.Mode()&0o111 != 0 {
			return true
		}
	}
	return false
}

// ExecInContainer runs cmd in the container; a non-zero exit becomes a utilexec.ExitError,
// which ServeExec reports to the client as the exit code.
func (rt *containerRuntime) ExecInContainer(ctx context.Context, name, uid, container string, cmd []string,
	in io.Reader, out, errOut io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize, timeout time.Duration) error {
	proc, err := rt.command(cmd)
	if err != nil {
		return err
	}
	done := make(chan struct{})
	defer close(done)
	started := func() { go rt.killWithContainer(proc, done) }
	if tty {
		if _, set := rt.container.Env["TERM"]; !set {
			proc.Env = append(proc.Env, "TERM=xterm") // as containerd does for a TTY exec
		}
		err = runWithTTY(proc, in, out, resize, started)
	} else {
		err = runWithPipes(proc, in, out, errOut, started)
	}
	if err != nil {
		return err
	}
	return exitError(proc.ProcessState)
}

// killWithContainer kills the command's process group once the container stops, as a runtime
// does with every process of a container; done is closed when the command has finished.
func (rt *containerRuntime) killWithContainer(proc *exec.Cmd, done <-chan struct{}) {
	for {
		select {
		case <-done:
			return
		case <-time.After(time.Second):
		}
		if !rt.stillRunning() {
			_ = syscall.Kill(-proc.Process.Pid, syscall.SIGKILL)
			return
		}
	}
}

func runWithPipes(proc *exec.Cmd, in io.Reader, out, errOut io.Writer, started func()) error {
	if out != nil {
		proc.Stdout = out
	}
	if errOut != nil {
		proc.Stderr = errOut
	}
	proc.WaitDelay = ioDrainTimeout
	var stdin io.WriteCloser
	if in != nil {
		// our own copy: exec.Cmd would otherwise wait for the client to close stdin
		pipe, err := proc.StdinPipe()
		if err != nil {
			return err
		}
		stdin = pipe
	}
	if err := proc.Start(); err != nil {
		return err
	}
	started()
	if stdin != nil {
		go func() {
			_, _ = io.Copy(stdin, in)
			_ = stdin.Close()
		}()
	}
	err := proc.Wait()
	var exitErr *exec.ExitError
	if err == nil || errors.As(err, &exitErr) || errors.Is(err, exec.ErrWaitDelay) {
		return nil // the status is in proc.ProcessState
	}
	return err
}

// exitError turns a finished process's status into what ServeExec expects: nil for 0, or an
// ExitError with the code (128+signal for a killed process, as a shell and runc report it).
func exitError(state *os.ProcessState) error {
	status, ok := state.Sys().(syscall.WaitStatus)
	code := state.ExitCode()
	if ok && status.Signaled() {
		code = 128 + int(status.Signal())
	}
	if code == 0 {
		return nil
	}
	return utilexec.CodeExitError{Err: fmt.Errorf("command terminated with exit code %d", code), Code: code}
}

// AttachContainer streams the container's output (its log, from now on) until it stops or
// the client goes away (seen when a write fails). Stdin reaches the container only when its
// spec has stdin: true; the end of the client's input ends nothing, as with stdinOnce: false.
func (rt *containerRuntime) AttachContainer(ctx context.Context, name, uid, container string,
	in io.Reader, out, errOut io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize) error {
	c := rt.container
	if resize != nil {
		go func() {
			for range resize { // containers never run on a terminal: nothing to resize
			}
		}()
	}
	if in != nil {
		go func() {
			if !c.Stdin || c.StdinPath == "" {
				_, _ = io.Copy(io.Discard, in) // the container has no input to write to
				return
			}
			// O_RDWR never blocks on a FIFO, even if the container stopped reading
			fifo, err := os.OpenFile(c.StdinPath, os.O_RDWR, 0)
			if err != nil {
				return
			}
			defer fifo.Close()
			_, _ = io.Copy(fifo, in)
		}()
	}
	sink := io.Writer(out)
	if out == nil {
		sink = errOut
	}
	log, err := os.Open(c.LogPath)
	if err != nil {
		return err
	}
	defer log.Close()
	if _, err := log.Seek(0, io.SeekEnd); err != nil {
		return err
	}
	buf := make([]byte, 32*1024)
	lastCheck := time.Now()
	for {
		n, err := log.Read(buf)
		if n > 0 && sink != nil {
			if _, werr := sink.Write(buf[:n]); werr != nil {
				return nil // the client went away
			}
		}
		if err != nil && err != io.EOF {
			return err
		}
		if n > 0 {
			continue
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond):
		}
		if time.Since(lastCheck) > time.Second {
			lastCheck = time.Now()
			if !rt.stillRunning() {
				return nil
			}
		}
	}
}

// stillRunning asks the kubelet whether this run of the container is still going.
func (rt *containerRuntime) stillRunning() bool {
	pod, err := rt.facts.pod(rt.pod.Namespace, rt.pod.Name)
	if err != nil {
		return true // the kubelet is busy: ask again later
	}
	if pod == nil || pod.UID != rt.pod.UID {
		return false
	}
	now := pod.Containers[rt.container.Name]
	return now != nil && now.Running && now.Pid == rt.container.Pid
}

// PortForward dials the pod's IP at port and copies both ways until the pod's side closes
// (the client's end of the stream closing only half-closes the connection to the pod).
func (rt *containerRuntime) PortForward(ctx context.Context, name, uid string, port int32, stream io.ReadWriteCloser) error {
	addr := net.JoinHostPort(rt.pod.PodIP, strconv.Itoa(int(port)))
	dialer := net.Dialer{Timeout: 10 * time.Second}
	conn, err := dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		// the shape of containerd's message for a port nothing listens on
		return fmt.Errorf("failed to connect to localhost:%d inside namespace %q, IPv4: %v", port, rt.pod.UID, err)
	}
	tcp := conn.(*net.TCPConn)
	defer tcp.Close()
	fromPod := make(chan error, 1)
	go func() {
		_, err := io.Copy(stream, tcp)
		fromPod <- err
	}()
	toPod := make(chan error, 1)
	go func() {
		_, err := io.Copy(tcp, stream)
		_ = tcp.CloseWrite()
		toPod <- err
	}()
	select {
	case err := <-fromPod:
		return err
	case err := <-toPod:
		if err != nil {
			return err
		}
		return <-fromPod
	}
}
