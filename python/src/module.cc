// _gatherer: the compiled half of the Python package `gatherer` (python/gatherer).
//
// One Core wraps one gatherer::Gatherer. Python calls gather() and stream()
// on a background thread of its own (never the asyncio loop's); both release
// the GIL while the C++ client fetches and take it back only to convert
// statements and responses, to pull from a Python iterable (the lazy source)
// and to hand a batch of responses to Python (the sink). cancel() may be
// called from any thread at any moment, as Gatherer::cancel().

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "gatherer/gatherer.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

// gatherer.GathererError (a RuntimeError with .index and .code), set by
// python/gatherer/__init__.py at import.
py::object& ErrorType() {
  static py::object* type = new py::object();  // never destroyed: outlives the interpreter's teardown
  return *type;
}

// Raises GathererError(message, index, code). GIL held.
[[noreturn]] void Raise(const std::string& message, std::int64_t index, std::string_view code) {
  py::object type = ErrorType();
  if (!type) throw std::runtime_error(message);
  py::object error = type(message, index, std::string(code));
  PyErr_SetObject(type.ptr(), error.ptr());
  throw py::error_already_set();
}

[[noreturn]] void Raise(const gatherer::Error& e) {
  Raise(e.what(), e.index(), gatherer::StatusCodeName(e.code()));
}

// A statement that cannot be converted: the message names its index.
[[noreturn]] void Invalid(std::uint64_t index, const std::string& why) {
  Raise("statement " + std::to_string(index) + " is invalid: " + why, static_cast<std::int64_t>(index),
        "invalid_argument");
}

std::string BytesOrStr(py::handle value, std::uint64_t index, const char* what) {
  if (PyBytes_Check(value.ptr())) return std::string(py::reinterpret_borrow<py::bytes>(value));
  if (PyByteArray_Check(value.ptr()))
    return std::string(PyByteArray_AsString(value.ptr()), static_cast<std::size_t>(PyByteArray_Size(value.ptr())));
  if (PyUnicode_Check(value.ptr())) {
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(value.ptr(), &size);
    if (!data) throw py::error_already_set();
    return std::string(data, static_cast<std::size_t>(size));
  }
  Invalid(index, std::string(what) + " must be str or bytes, not " + std::string(py::str(value.get_type().attr("__name__"))));
}

std::string Str(py::handle value, std::uint64_t index, const char* what) {
  if (!PyUnicode_Check(value.ptr()))
    Invalid(index, std::string(what) + " must be str, not " + std::string(py::str(value.get_type().attr("__name__"))));
  return value.cast<std::string>();
}

gatherer::Headers ToHeaders(py::handle value, std::uint64_t index) {
  gatherer::Headers out;
  if (value.is_none()) return out;
  if (PyDict_Check(value.ptr())) {
    for (auto [k, v] : py::reinterpret_borrow<py::dict>(value))
      out.emplace_back(Str(k, index, "a header name"), Str(v, index, "a header value"));
    return out;
  }
  if (PyList_Check(value.ptr()) || PyTuple_Check(value.ptr())) {
    for (py::handle pair : value) {
      if (!(PyList_Check(pair.ptr()) || PyTuple_Check(pair.ptr())) || py::len(pair) != 2)
        Invalid(index, "headers must be a dict or a list of (name, value) pairs");
      out.emplace_back(Str(pair[py::int_(0)], index, "a header name"), Str(pair[py::int_(1)], index, "a header value"));
    }
    return out;
  }
  Invalid(index, "headers must be a dict or a list of (name, value) pairs");
}

// A URL string, a dict {method, url, headers, body, timeout_ms, idempotent}
// or a Statement. GIL held.
void ToStatement(py::handle item, std::uint64_t index, gatherer::Statement& out) {
  if (PyUnicode_Check(item.ptr())) {
    out.method = "GET";
    out.url = item.cast<std::string>();
    out.headers.clear();
    out.body.clear();
    out.timeout_ms = 0;
    out.idempotent.reset();
    return;
  }
  if (py::isinstance<gatherer::Statement>(item)) {
    out = item.cast<const gatherer::Statement&>();
    return;
  }
  if (!PyDict_Check(item.ptr()))
    Invalid(index, "a statement is a URL (str), a dict or a gatherer.Statement, not " +
                       std::string(py::str(item.get_type().attr("__name__"))));
  out = gatherer::Statement{};
  bool has_url = false;
  for (auto [key, value] : py::reinterpret_borrow<py::dict>(item)) {
    if (!PyUnicode_Check(key.ptr())) Invalid(index, "keys must be str");
    const std::string k = key.cast<std::string>();
    if (k == "url") {
      out.url = Str(value, index, "url");
      has_url = true;
    } else if (value.is_none()) {
      continue;  // None means absent
    } else if (k == "method") {
      out.method = Str(value, index, "method");
    } else if (k == "headers") {
      out.headers = ToHeaders(value, index);
    } else if (k == "body") {
      out.body = BytesOrStr(value, index, "body");
    } else if (k == "timeout_ms") {
      if (!PyLong_Check(value.ptr()) || PyBool_Check(value.ptr())) Invalid(index, "timeout_ms must be an int");
      const long long ms = value.cast<long long>();
      if (ms < 0 || ms > 0xFFFFFFFFll) Invalid(index, "timeout_ms out of range");
      out.timeout_ms = static_cast<std::uint32_t>(ms);
    } else if (k == "idempotent") {
      if (!PyBool_Check(value.ptr())) Invalid(index, "idempotent must be a bool");
      out.idempotent = value.cast<bool>();
    } else {
      Invalid(index, "unknown key '" + k + "' (method, url, headers, body, timeout_ms, idempotent)");
    }
  }
  if (!has_url) Invalid(index, "no url");
}

py::str Latin1(const std::string& value) {
  // Header values are bytes; Latin-1 maps each to one character, losslessly.
  return py::reinterpret_steal<py::str>(
      PyUnicode_DecodeLatin1(value.data(), static_cast<Py_ssize_t>(value.size()), nullptr));
}

py::list HeadersList(const gatherer::Headers& headers) {
  py::list out(headers.size());
  for (std::size_t i = 0; i < headers.size(); ++i) out[i] = py::make_tuple(Latin1(headers[i].first), Latin1(headers[i].second));
  return out;
}

template <typename T>
T Get(const py::dict& d, const char* key, T fallback) {
  if (!d.contains(key)) return fallback;
  py::object v = d[key];
  if (v.is_none()) return fallback;
  return v.cast<T>();
}

class Core {
 public:
  explicit Core(const py::dict& o) {
    static const char* known[] = {"broker", "workers", "log_level", "cancel_on_raise", "prefetch", "reorder_buffer",
                                  "max_in_flight_bytes", "embedded_io_threads", "connect_timeout_ms",
                                  "broker_timeout_ms", "base_url", "headers", "timeout_ms", "session_connect_timeout_ms",
                                  "max_attempts", "backoff_base_ms", "backoff_max_ms", "retry_after_max_ms",
                                  "max_body_bytes", "max_redirects", "accept_min", "accept_max",
                                  "curve_broker_key", "curve_public_key", "curve_secret_key", "max_buffered_bytes",
                                  "cacert", "cert", "key", "insecure", "proxy", "no_proxy"};
    for (auto [key, value] : o) {
      const std::string k = key.cast<std::string>();
      bool ok = false;
      for (const char* name : known) ok = ok || k == name;
      if (!ok) throw py::type_error("Gatherer: unknown option '" + k + "'");
    }
    gatherer::Options opt;
    opt.broker = Get<std::string>(o, "broker", "");
    opt.workers = Get<int>(o, "workers", opt.workers);
    opt.log_level = Get<int>(o, "log_level", opt.log_level);
    opt.cancel_on_raise = Get<bool>(o, "cancel_on_raise", false);
    opt.prefetch = Get<int>(o, "prefetch", 0);
    opt.reorder_buffer = Get<int>(o, "reorder_buffer", 0);
    opt.max_in_flight_bytes = Get<std::uint64_t>(o, "max_in_flight_bytes", opt.max_in_flight_bytes);
    opt.max_buffered_bytes = Get<std::uint64_t>(o, "max_buffered_bytes", opt.max_buffered_bytes);
    // TLS files are read and checked when the Gatherer is made, before
    // anything is sent (Options::cacert, cert, key).
    opt.cacert = Get<std::string>(o, "cacert", "");
    opt.cert = Get<std::string>(o, "cert", "");
    opt.key = Get<std::string>(o, "key", "");
    opt.embedded_io_threads = Get<unsigned>(o, "embedded_io_threads", 0);
    opt.connect_timeout = std::chrono::milliseconds(Get<std::int64_t>(o, "connect_timeout_ms", 30'000));
    opt.broker_timeout = std::chrono::milliseconds(Get<std::int64_t>(o, "broker_timeout_ms", 60'000));
    opt.curve_broker_key = Get<std::string>(o, "curve_broker_key", "");
    opt.curve_public_key = Get<std::string>(o, "curve_public_key", "");
    opt.curve_secret_key = Get<std::string>(o, "curve_secret_key", "");
    gatherer::SessionSettings& s = opt.settings;
    s.base_url = Get<std::string>(o, "base_url", "");
    if (o.contains("headers")) s.headers = ToHeaders(o["headers"], 0);
    s.timeout_ms = Get<std::uint32_t>(o, "timeout_ms", s.timeout_ms);
    s.connect_timeout_ms = Get<std::uint32_t>(o, "session_connect_timeout_ms", s.connect_timeout_ms);
    s.max_attempts = Get<std::uint32_t>(o, "max_attempts", s.max_attempts);
    s.backoff_base_ms = Get<std::uint32_t>(o, "backoff_base_ms", s.backoff_base_ms);
    s.backoff_max_ms = Get<std::uint32_t>(o, "backoff_max_ms", s.backoff_max_ms);
    s.retry_after_max_ms = Get<std::uint32_t>(o, "retry_after_max_ms", s.retry_after_max_ms);
    s.max_body_bytes = Get<std::uint64_t>(o, "max_body_bytes", s.max_body_bytes);
    s.max_redirects = Get<std::uint32_t>(o, "max_redirects", s.max_redirects);
    s.accept_min = Get<std::uint16_t>(o, "accept_min", s.accept_min);
    s.accept_max = Get<std::uint16_t>(o, "accept_max", s.accept_max);
    s.tls_insecure = Get<bool>(o, "insecure", false);
    s.proxy = Get<std::string>(o, "proxy", "");
    s.no_proxy = Get<std::string>(o, "no_proxy", "");
    s.workers = static_cast<std::uint32_t>(opt.workers > 0 ? opt.workers : 0);
    std::optional<gatherer::Error> failed;
    {
      py::gil_scoped_release release;  // an embedded cluster starts threads
      try {
        g_ = std::make_unique<gatherer::Gatherer>(std::move(opt));
      } catch (const gatherer::Error& e) {
        failed = e;
      }
    }
    if (failed) Raise(*failed);
  }

  ~Core() {
    // close() was not called (the Python object was dropped): close here,
    // without the GIL, since the destructor waits for the broker.
    if (g_) {
      py::gil_scoped_release release;
      g_.reset();
    }
  }

  // Converts and fetches every statement; returns the responses in order.
  // Called on a background thread. An invalid statement raises before
  // anything is sent.
  py::list gather(const py::sequence& statements) {
    gatherer::Gatherer& g = live();
    std::vector<gatherer::Statement> list(py::len(statements));
    std::uint64_t i = 0;
    for (py::handle item : statements) {
      ToStatement(item, i, list[i]);
      ++i;
    }
    if (cancelled_.load()) Raise("gather cancelled", -1, "cancelled");
    std::optional<gatherer::Error> failed;
    std::vector<gatherer::Response> responses;
    {
      py::gil_scoped_release release;
      g.statements = std::move(list);
      try {
        g.gather();
      } catch (const gatherer::Error& e) {
        failed = e;
      }
      responses = std::move(g.responses);
      g.responses.clear();
      g.statements.clear();
      g.statements.shrink_to_fit();
    }
    py::list out(responses.size());
    for (std::size_t k = 0; k < responses.size(); ++k) out[k] = py::cast(std::move(responses[k]));
    if (failed) {
      last_partial_ = out;
      Raise(*failed);
    }
    last_partial_ = py::none();
    return out;
  }

  // The responses a failed gather() had (complete ones, default elsewhere).
  py::object partial() {
    py::object out = last_partial_;
    last_partial_ = py::none();
    return out;
  }

  // Streams the statements of `iterable` (pulled lazily, with the GIL, only
  // when the window has room) and hands lists of (index, Response) to
  // `sink` (with the GIL) as they are ready: a batch is handed over when it
  // holds `batch` responses or whenever the stream is about to wait. `sink`
  // returns False to stop the stream (the rest is cancelled). Called on a
  // background thread; returns when the stream ends.
  void stream(const py::object& iterable, bool completion, const py::function& sink, std::size_t batch) {
    gatherer::Gatherer& g = live();
    py::object it = py::reinterpret_steal<py::object>(PyObject_GetIter(iterable.ptr()));
    if (!it) throw py::error_already_set();
    if (batch == 0) batch = 1;

    // Errors met in callbacks, raised after the stream ended (GIL held).
    py::object source_error;       // an exception from the iterable or a bad statement
    py::object sink_error;         // an exception from the sink
    bool stopped = false;          // the sink said stop
    std::uint64_t pulled = 0;

    auto source = [&](gatherer::Statement& out) -> bool {
      if (cancelled_.load() || stopped) return false;
      py::gil_scoped_acquire gil;
      try {
        py::object item = py::reinterpret_steal<py::object>(PyIter_Next(it.ptr()));
        if (!item) {
          if (PyErr_Occurred()) throw py::error_already_set();
          return false;
        }
        ToStatement(item, pulled, out);
        ++pulled;
        return true;
      } catch (py::error_already_set& e) {
        source_error = e.value();
        g.cancel();  // stop at once: what completed before is still handed out
        return false;
      }
    };

    std::vector<gatherer::Indexed> ready;
    ready.reserve(batch);
    // Hands `ready` to Python. Called without the GIL.
    auto flush = [&]() {
      if (ready.empty() || stopped) {
        ready.clear();
        return;
      }
      py::gil_scoped_acquire gil;
      try {
        py::list items(ready.size());
        for (std::size_t k = 0; k < ready.size(); ++k)
          items[k] = py::make_tuple(ready[k].index, py::cast(std::move(ready[k].response)));
        ready.clear();
        py::object more = sink(std::move(items));
        if (!more.is_none() && !more.cast<bool>()) stopped = true;
      } catch (py::error_already_set& e) {
        sink_error = e.value();
        stopped = true;
      }
      ready.clear();
      if (stopped) g.cancel();
    };

    std::optional<gatherer::Error> failed;
    {
      py::gil_scoped_release release;
      try {
        gatherer::Stream s =
            g.stream(source, completion ? gatherer::Order::kCompletion : gatherer::Order::kInput);
        s.on_wait([&] {
          flush();
          // A cancel() that came before the run started was cleared by it.
          if (cancelled_.load()) g.cancel();
        });
        while (auto item = s.next()) {
          if (stopped) continue;  // cancelled already; drain what is handed out
          ready.push_back(std::move(*item));
          if (ready.size() >= batch) flush();
        }
        flush();
      } catch (const gatherer::Error& e) {
        failed = e;
        try {
          flush();  // what was handed out before the error
        } catch (...) {
        }
      }
    }
    if (sink_error) {
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(sink_error.ptr())), sink_error.ptr());
      throw py::error_already_set();
    }
    if (source_error) {
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(source_error.ptr())), source_error.ptr());
      throw py::error_already_set();
    }
    if (stopped) return;  // the reader left: its cancel is no error
    if (failed) Raise(*failed);
  }

  // From any thread, with or without a run: a run in progress stops, and a
  // run that starts later on this Core is refused (cancel is for good until
  // reset()).
  void cancel() {
    cancelled_.store(true);
    std::lock_guard lock(mu_);
    if (g_) g_->cancel();
  }
  void reset() { cancelled_.store(false); }

  // Closes the session (waits for the broker, GIL released).
  void close() {
    std::unique_ptr<gatherer::Gatherer> g;
    {
      std::lock_guard lock(mu_);
      g = std::move(g_);
    }
    py::gil_scoped_release release;
    g.reset();
  }

  bool closed() {
    std::lock_guard lock(mu_);
    return !g_;
  }

  std::string session_id() { return live().session_id(); }

 private:
  gatherer::Gatherer& live() {
    std::lock_guard lock(mu_);
    if (!g_) throw py::value_error("this Gatherer is closed");
    return *g_;
  }

  std::mutex mu_;  // g_ itself (close() against cancel() from another thread)
  std::unique_ptr<gatherer::Gatherer> g_;
  std::atomic<bool> cancelled_{false};
  py::object last_partial_ = py::none();
};

}  // namespace

PYBIND11_MODULE(_gatherer, m) {
  m.doc() = "Gatherer's C++ client (see the package gatherer)";
  m.attr("__version__") = GATHERER_VERSION;
  m.def("_set_error_type", [](py::object type) { ErrorType() = std::move(type); });

  py::class_<gatherer::Statement>(m, "Statement",
                                  "One HTTP request: method, url, headers, body, timeout_ms, idempotent.")
      .def(py::init([](std::string url, std::string method, py::object headers, py::object body,
                       std::uint32_t timeout_ms, std::optional<bool> idempotent) {
             gatherer::Statement s;
             s.url = std::move(url);
             s.method = std::move(method);
             s.headers = ToHeaders(headers, 0);
             if (!body.is_none()) s.body = BytesOrStr(body, 0, "body");
             s.timeout_ms = timeout_ms;
             s.idempotent = idempotent;
             return s;
           }),
           "url"_a, "method"_a = "GET", "headers"_a = py::none(), "body"_a = py::none(), "timeout_ms"_a = 0,
           "idempotent"_a = py::none())
      .def_readwrite("url", &gatherer::Statement::url)
      .def_readwrite("method", &gatherer::Statement::method)
      .def_property(
          "headers", [](const gatherer::Statement& s) { return HeadersList(s.headers); },
          [](gatherer::Statement& s, py::object h) { s.headers = ToHeaders(h, 0); })
      .def_property(
          "body", [](const gatherer::Statement& s) { return py::bytes(s.body); },
          [](gatherer::Statement& s, py::object b) { s.body = b.is_none() ? std::string() : BytesOrStr(b, 0, "body"); })
      .def_readwrite("timeout_ms", &gatherer::Statement::timeout_ms)
      .def_readwrite("idempotent", &gatherer::Statement::idempotent)
      .def("__repr__", [](const gatherer::Statement& s) { return "<Statement " + s.method + " " + s.url + ">"; });

  py::class_<gatherer::ResponseError>(m, "ResponseError", "Why a statement failed: code (a name) and message.")
      .def_property_readonly("code",
                             [](const gatherer::ResponseError& e) { return std::string(gatherer::StatusCodeName(e.code)); })
      .def_readonly("message", &gatherer::ResponseError::message)
      .def("__str__", [](const gatherer::ResponseError& e) {
        return std::string(gatherer::StatusCodeName(e.code)) + ": " + e.message;
      })
      .def("__repr__", [](const gatherer::ResponseError& e) {
        return "<ResponseError " + std::string(gatherer::StatusCodeName(e.code)) + ": " + e.message + ">";
      });

  py::class_<gatherer::Response>(m, "Response",
                                 "One statement's outcome: status, headers, body (bytes), text, json(), error "
                                 "(None on success), attempts, elapsed (seconds), worker.")
      .def_readonly("status", &gatherer::Response::status)
      .def_property_readonly("body", [](const gatherer::Response& r) { return py::bytes(r.body); })
      .def_property_readonly("text",
                             [](const gatherer::Response& r) {
                               return py::reinterpret_steal<py::str>(PyUnicode_DecodeUTF8(
                                   r.body.data(), static_cast<Py_ssize_t>(r.body.size()), "replace"));
                             })
      .def("json",
           [](const gatherer::Response& r) {
             return py::module_::import("json").attr("loads")(py::bytes(r.body));
           })
      .def_property_readonly("headers",
                             [](const gatherer::Response& r) {
                               // A name received more than once: its values joined by ", ".
                               py::dict out;
                               py::object lower = py::module_::import("builtins").attr("str").attr("lower");
                               py::dict spelled;
                               for (const auto& [name, value] : r.headers) {
                                 py::str key = Latin1(name);
                                 py::object folded = lower(key);
                                 py::str v = Latin1(value);
                                 if (spelled.contains(folded)) {
                                   py::object first = spelled[folded];
                                   out[first] = py::str(out[first]) + py::str(", ") + v;
                                 } else {
                                   spelled[folded] = key;
                                   out[key] = v;
                                 }
                               }
                               return out;
                             })
      .def_property_readonly("raw_headers", [](const gatherer::Response& r) { return HeadersList(r.headers); })
      .def_property_readonly("error",
                             [](const gatherer::Response& r) -> py::object {
                               if (!r.error) return py::none();
                               return py::cast(*r.error);
                             })
      .def_readonly("attempts", &gatherer::Response::attempts)
      .def_property_readonly("elapsed", [](const gatherer::Response& r) { return r.elapsed_us / 1e6; })
      .def_readonly("elapsed_us", &gatherer::Response::elapsed_us)
      .def_readonly("worker", &gatherer::Response::worker)
      .def_property_readonly("ok", &gatherer::Response::ok)
      .def("__repr__", [](const gatherer::Response& r) {
        std::string out = "<Response " + std::to_string(r.status);
        if (r.error) out += " " + std::string(gatherer::StatusCodeName(r.error->code)) + ": " + r.error->message;
        return out + ", " + std::to_string(r.body.size()) + " bytes>";
      });

  py::class_<Core>(m, "_Core")
      .def(py::init<const py::dict&>())
      .def("gather", &Core::gather)
      .def("partial", &Core::partial)
      .def("stream", &Core::stream)
      .def("cancel", &Core::cancel)
      .def("reset", &Core::reset)
      .def("close", &Core::close)
      .def_property_readonly("closed", &Core::closed)
      .def_property_readonly("session_id", &Core::session_id);
}
