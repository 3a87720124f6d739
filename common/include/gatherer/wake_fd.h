#pragma once
// WakeFd: an eventfd that one thread polls (with zmq::poll or epoll) and any
// thread signals: the stop, cancel and "results ready" wake-ups of the
// broker, worker, fetcher and client loops.
//
// Thread-safety: signal() from any thread; fd() and drain() by the polling
// thread. Not copyable; the fd is closed on destruction.

namespace gatherer {

class WakeFd {
 public:
  // Throws std::system_error if the kernel refuses an eventfd.
  WakeFd();
  ~WakeFd();
  WakeFd(const WakeFd&) = delete;
  WakeFd& operator=(const WakeFd&) = delete;

  int fd() const { return fd_; }
  // Makes fd() readable. Never blocks; signals coalesce.
  void signal();
  // Makes fd() unreadable again (consumes every signal so far).
  void drain();

 private:
  int fd_;
};

}  // namespace gatherer
