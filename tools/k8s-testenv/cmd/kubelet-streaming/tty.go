package main

import (
	"io"
	"os/exec"
	"time"

	"github.com/creack/pty"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
)

// runWithTTY runs proc on a new pseudo-terminal (its controlling terminal, in a new session),
// copying in to it and its output to out, and applying the client's resize events.
func runWithTTY(proc *exec.Cmd, in io.Reader, out io.Writer, resize <-chan remotecommand.TerminalSize, started func()) error {
	proc.SysProcAttr.Setpgid = false // a new session is a new group already (setpgid would fail)
	terminal, err := pty.Start(proc)
	if err != nil {
		return err
	}
	defer terminal.Close()
	started()
	if resize != nil {
		go func() {
			for size := range resize {
				_ = pty.Setsize(terminal, &pty.Winsize{Rows: size.Height, Cols: size.Width})
			}
		}()
	}
	if in != nil {
		go func() { _, _ = io.Copy(terminal, in) }()
	}
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		if out == nil {
			out = io.Discard
		}
		// ends with EIO once every holder of the terminal's other side has closed it
		_, _ = io.Copy(out, terminal)
	}()
	waitErr := proc.Wait()
	select {
	case <-copied:
	case <-time.After(ioDrainTimeout): // a background child still holds the terminal
	}
	if _, exited := waitErr.(*exec.ExitError); waitErr != nil && !exited {
		return waitErr
	}
	return nil
}
