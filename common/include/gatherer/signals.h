#pragma once
// Signal handling for the thin mains: block SIGINT and SIGTERM in every
// thread (call before starting any), then wait for one on the main thread.

#include <chrono>
#include <csignal>

namespace gatherer {

// Blocks SIGINT and SIGTERM for this thread and the threads it starts later.
void BlockTerminationSignals();

// Waits until SIGINT or SIGTERM arrives; returns its number.
int WaitForTerminationSignal();
// Same, for at most `timeout`; 0 when none arrived.
int WaitForTerminationSignal(std::chrono::milliseconds timeout);

}  // namespace gatherer
