// libFuzzer target for every GTR/2 decoder of common/include/gatherer/protocol.h:
// PeekCommand, DecodeSessionRef, DecodeOpen, DecodeStatements, DecodeSubmit, DecodeResults,
// DecodeResultsIndex, DecodeSession, DecodeEndSession, DecodeReady,
// DecodeError, DecodeHeartbeat, DecodeBrokerHeartbeat, DecodeAck, DecodeSync,
// DecodeSynced, DecodeHolding, DecodeEmpty, the control decoders of §3.9
// (DecodeStatusReport, DecodeWorkersReport, DecodeSessionsReport,
// DecodeWorkerName, DecodeDone) (and RestampResults).
//
// The input is split into frames (framing.h) and every decoder runs on every
// input, whatever frames 0 and 1 say: a receiver calls a decoder only after
// PeekCommand, but the decoders must survive any frames (PROTOCOL.md §2.4).
// Beyond "no crash, no leak, no UB" (ASan, UBSan, libFuzzer's leak check;
// an exception escaping a decoder terminates the process), it checks:
//   - round trip: a decoded value, encoded again, carries the command its
//     encoder names and decodes to an equal value (seqs included);
//   - DecodeSubmit (the broker's) succeeds whenever DecodeStatements does,
//     and the DISPATCH of what it holds decodes to the same statements;
//   - DecodeResultsIndex agrees with DecodeResults whenever both succeed,
//     and succeeds whenever DecodeResults does (it checks a subset);
//   - RestampResults changes frame 2 only: the results decode unchanged
//     under the new session and seq (the broker's forwarding, §3.6.1);
//   - decoded ranges have 1 ≤ count ≤ 65,536 (§3.1);
//   - PeekCommand accepts only the signature, version 2 and a known command.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string_view>

#include "framing.h"
#include "fuzz_check.h"
#include "gatherer/protocol.h"

namespace gatherer::fuzz {
namespace {

using namespace gatherer::protocol;

bool Same(const SessionSettings& a, const SessionSettings& b) {
  return a.workers == b.workers && a.base_url == b.base_url && a.headers == b.headers &&
         a.timeout_ms == b.timeout_ms && a.connect_timeout_ms == b.connect_timeout_ms &&
         a.max_attempts == b.max_attempts && a.backoff_base_ms == b.backoff_base_ms &&
         a.backoff_max_ms == b.backoff_max_ms && a.max_body_bytes == b.max_body_bytes &&
         a.max_redirects == b.max_redirects && a.accept_min == b.accept_min &&
         a.accept_max == b.accept_max && a.rate_limits == b.rate_limits &&
         a.learn_rate_limits == b.learn_rate_limits;
}

bool Same(const Statement& a, const Statement& b) {
  return a.method == b.method && a.url == b.url && a.headers == b.headers && a.body == b.body &&
         a.timeout_ms == b.timeout_ms && a.idempotent == b.idempotent;
}

bool Same(const Response& a, const Response& b) {
  if (a.error.has_value() != b.error.has_value()) return false;
  if (a.error && (a.error->code != b.error->code || a.error->message != b.error->message)) return false;
  return a.status == b.status && a.headers == b.headers && a.body == b.body &&
         a.attempts == b.attempts && a.elapsed_us == b.elapsed_us && a.worker == b.worker;
}

// Encoded frames must name the command their encoder was asked for.
void CheckCommand(const Frames& frames, Command expected) {
  auto c = PeekCommand(frames);
  FUZZ_CHECK(c.has_value() && *c == expected);
}

void CheckPeek(const Frames& frames) {
  auto c = PeekCommand(frames);
  if (!c) return;
  FUZZ_CHECK(frames[0].size() == kSignature.size());
  FUZZ_CHECK(std::memcmp(frames[0].data(), kSignature.data(), kSignature.size()) == 0);
  FUZZ_CHECK(frames[1].size() == 1);
  FUZZ_CHECK(*static_cast<const std::uint8_t*>(frames[1].data()) == static_cast<std::uint8_t>(*c));
  FUZZ_CHECK(std::string_view(CommandName(*c)) != "UNKNOWN");
  FUZZ_CHECK(static_cast<const std::uint8_t*>(frames[0].data())[3] == kVersion);
}

void CheckSessionRef(const Frames& frames) {
  auto m = DecodeSessionRef(frames);
  if (!m) return;
  // END_SESSION carries an order seq in GTR/2: DecodeEndSession's.
  for (Command c : {Command::kCancel, Command::kClose, Command::kOpened, Command::kClosed}) {
    Frames again = Encode(c, *m);
    CheckCommand(again, c);
    auto back = DecodeSessionRef(again);
    FUZZ_CHECK(back && back->session == m->session);
  }
}

void CheckOpen(const Frames& frames) {
  auto m = DecodeOpen(frames);
  if (!m) return;
  Frames again = Encode(*m);
  CheckCommand(again, Command::kOpen);
  auto back = DecodeOpen(again);
  FUZZ_CHECK(back && back->session == m->session && Same(back->settings, m->settings) &&
             back->prefetch == m->prefetch);
}

void CheckStatements(const Frames& frames) {
  auto m = DecodeStatements(frames);
  auto held = DecodeSubmit(frames);
  if (!m) return;
  FUZZ_CHECK(held && held->session == m->session && held->statements.size() == m->statements.size());
  {
    auto forwarded = DecodeStatements(EncodeDispatch(held->session, held->statements, 1));
    FUZZ_CHECK(forwarded && forwarded->statements.size() == m->statements.size());
    for (std::size_t i = 0; i < m->statements.size(); ++i) {
      FUZZ_CHECK(forwarded->statements[i].index == m->statements[i].index);
      FUZZ_CHECK(Same(forwarded->statements[i].statement, m->statements[i].statement));
      FUZZ_CHECK(forwarded->statements[i].rate_wait_us == 0 && forwarded->statements[i].throttled == 0);
    }
  }
  // Only a DISPATCH carries a seq (§3.5); SUBMIT's is 0.
  const bool dispatch = frames[1].size() == 1 &&
                        *static_cast<const std::uint8_t*>(frames[1].data()) == static_cast<std::uint8_t>(Command::kDispatch);
  FUZZ_CHECK(dispatch || m->seq == 0);
  for (Command c : {Command::kSubmit, Command::kDispatch}) {
    Frames again = Encode(c, *m);
    CheckCommand(again, c);
    auto back = DecodeStatements(again);
    FUZZ_CHECK(back && back->session == m->session && back->statements.size() == m->statements.size());
    FUZZ_CHECK(back->seq == (c == Command::kDispatch ? m->seq : 0));
    for (std::size_t i = 0; i < m->statements.size(); ++i) {
      FUZZ_CHECK(back->statements[i].index == m->statements[i].index);
      FUZZ_CHECK(Same(back->statements[i].statement, m->statements[i].statement));
    }
  }
  // EncodeSubmit numbers the statements itself, from the first index on.
  std::vector<Statement> plain;
  plain.reserve(m->statements.size());
  for (const auto& ws : m->statements) plain.push_back(ws.statement);
  const std::uint64_t first = m->statements.empty() ? 0 : m->statements[0].index;
  Frames again = EncodeSubmit(m->session, first, plain);
  CheckCommand(again, Command::kSubmit);
  auto back = DecodeStatements(again);
  FUZZ_CHECK(back && back->session == m->session && back->statements.size() == plain.size());
  for (std::size_t i = 0; i < plain.size(); ++i) {
    FUZZ_CHECK(back->statements[i].index == first + i);
    FUZZ_CHECK(Same(back->statements[i].statement, plain[i]));
  }
}

void CheckResults(const Frames& frames) {
  auto index = DecodeResultsIndex(frames);
  auto m = DecodeResults(frames);
  if (!m) return;
  FUZZ_CHECK(index && index->session == m->session && index->seq == m->seq &&
             index->indices.size() == m->results.size());
  for (std::size_t i = 0; i < m->results.size(); ++i) FUZZ_CHECK(index->indices[i] == m->results[i].index);

  Results copy = *m;  // Encode(Results&&) moves the bodies out
  Frames again = Encode(std::move(copy));
  CheckCommand(again, Command::kResults);
  auto back = DecodeResults(again);
  FUZZ_CHECK(back && back->session == m->session && back->seq == m->seq &&
             back->results.size() == m->results.size());
  for (std::size_t i = 0; i < m->results.size(); ++i) {
    FUZZ_CHECK(back->results[i].index == m->results[i].index);
    FUZZ_CHECK(Same(back->results[i].response, m->results[i].response));
    FUZZ_CHECK(back->results[i].rate == m->results[i].rate);
  }
  // Both decoders see the same rate reports (§3.8.6).
  std::size_t reports = 0;
  for (const auto& r : m->results) reports += r.rate.has_value() ? 1 : 0;
  FUZZ_CHECK(index->rates.size() == reports);

  // The broker's forwarding: a frame 2 of its own, frames 3 on untouched.
  Frames forwarded(frames.size());
  for (std::size_t i = 0; i < frames.size(); ++i) forwarded[i].copy(const_cast<zmq::message_t&>(frames[i]));
  SessionId other = m->session;
  other.bytes[0] ^= 0xff;
  RestampResults(forwarded, other, m->seq + 1);
  auto restamped = DecodeResults(forwarded);
  FUZZ_CHECK(restamped && restamped->session == other && restamped->seq == m->seq + 1 &&
             restamped->results.size() == m->results.size());
  for (std::size_t i = 0; i < m->results.size(); ++i) {
    FUZZ_CHECK(restamped->results[i].index == m->results[i].index);
    FUZZ_CHECK(Same(restamped->results[i].response, m->results[i].response));
  }
}

void CheckSession(const Frames& frames) {
  auto m = DecodeSession(frames);
  if (!m) return;
  Frames again = Encode(*m);
  CheckCommand(again, Command::kSession);
  auto back = DecodeSession(again);
  FUZZ_CHECK(back && back->session == m->session && Same(back->settings, m->settings) && back->seq == m->seq);
}

void CheckEndSession(const Frames& frames) {
  auto m = DecodeEndSession(frames);
  if (!m) return;
  Frames again = Encode(*m);
  CheckCommand(again, Command::kEndSession);
  auto back = DecodeEndSession(again);
  FUZZ_CHECK(back && back->session == m->session && back->seq == m->seq);
}

void CheckAck(const Frames& frames) {
  auto m = DecodeAck(frames);
  if (!m) return;
  Frames again = Encode(*m);
  CheckCommand(again, Command::kAck);
  auto back = DecodeAck(again);
  FUZZ_CHECK(back && back->session == m->session && back->seq == m->seq);
}

void CheckRanges(const std::vector<IndexRange>& ranges) {
  FUZZ_CHECK(ranges.size() <= kMaxBatch);
  for (const auto& r : ranges) FUZZ_CHECK(r.count >= 1 && r.count <= kMaxBatch);  // §3.1
}

void CheckSync(const Frames& frames) {
  auto m = DecodeSync(frames);
  if (!m) return;
  CheckRanges(m->unanswered);
  Frames again = Encode(*m);
  CheckCommand(again, Command::kSync);
  auto back = DecodeSync(again);
  FUZZ_CHECK(back && back->session == m->session && back->ack == m->ack && back->unanswered == m->unanswered);
}

void CheckSynced(const Frames& frames) {
  auto m = DecodeSynced(frames);
  if (!m) return;
  CheckRanges(m->missing);
  Frames again = Encode(*m);
  CheckCommand(again, Command::kSynced);
  auto back = DecodeSynced(again);
  FUZZ_CHECK(back && back->session == m->session && back->missing == m->missing && back->seq == m->seq);
}

void CheckHolding(const Frames& frames) {
  auto m = DecodeHolding(frames);
  if (!m) return;
  FUZZ_CHECK(m->sessions.size() <= kMaxBatch);
  Frames again = Encode(*m);
  CheckCommand(again, Command::kHolding);
  auto back = DecodeHolding(again);
  FUZZ_CHECK(back && back->seq == m->seq && back->sessions == m->sessions);
}

void CheckReady(const Frames& frames) {
  auto m = DecodeReady(frames);
  if (!m) return;
  FUZZ_CHECK(m->slots >= 1);  // §3.4
  Frames again = Encode(*m);
  CheckCommand(again, Command::kReady);
  auto back = DecodeReady(again);
  FUZZ_CHECK(back && back->worker_id == m->worker_id && back->host == m->host &&
             back->slots == m->slots && back->pid == m->pid);
}

// §3.9: control reports and requests round-trip.
void CheckControl(const Frames& frames) {
  if (auto m = DecodeStatusReport(frames)) {
    Frames again = Encode(*m);
    CheckCommand(again, Command::kStatusReport);
    auto back = DecodeStatusReport(again);
    FUZZ_CHECK(back && *back == *m);
  }
  if (auto m = DecodeWorkersReport(frames)) {
    Frames again = Encode(*m);
    CheckCommand(again, Command::kWorkersReport);
    auto back = DecodeWorkersReport(again);
    FUZZ_CHECK(back && *back == *m);
  }
  if (auto m = DecodeSessionsReport(frames)) {
    Frames again = Encode(*m);
    CheckCommand(again, Command::kSessionsReport);
    auto back = DecodeSessionsReport(again);
    FUZZ_CHECK(back && *back == *m);
  }
  if (auto m = DecodeWorkerName(frames)) {
    FUZZ_CHECK(!m->worker_id.empty());
    Frames again = Encode(*m);
    CheckCommand(again, Command::kDrainWorker);
    auto back = DecodeWorkerName(again);
    FUZZ_CHECK(back && back->worker_id == m->worker_id);
  }
  if (auto m = DecodeDone(frames)) {
    Frames again = Encode(*m);
    CheckCommand(again, Command::kDone);
    auto back = DecodeDone(again);
    FUZZ_CHECK(back && back->message == m->message);
  }
}

void CheckError(const Frames& frames) {
  auto m = DecodeError(frames);
  if (!m) return;
  Frames again = Encode(*m);
  CheckCommand(again, Command::kError);
  auto back = DecodeError(again);
  FUZZ_CHECK(back && back->code == m->code && back->message == m->message &&
             back->session == m->session);
}

// At the broker: a client's HEARTBEAT [session] or a worker's [].
void CheckHeartbeat(const Frames& frames) {
  auto m = DecodeHeartbeat(frames);
  if (!m) return;
  Frames again = *m ? Encode(**m) : EncodeHeartbeat();
  CheckCommand(again, Command::kHeartbeat);
  auto back = DecodeHeartbeat(again);
  FUZZ_CHECK(back && back->has_value() == m->has_value());
  FUZZ_CHECK(!*m || (*back)->session == (*m)->session);
  if (*m) {
    Frames plain = EncodeHeartbeat((*m)->session);
    auto same = DecodeHeartbeat(plain);
    FUZZ_CHECK(same && *same && (**same).session == (*m)->session);
  }
}

// At a client or worker: the broker's HEARTBEAT [seq] or [session, seq,
// next_index, workers].
void CheckBrokerHeartbeat(const Frames& frames) {
  auto m = DecodeBrokerHeartbeat(frames);
  if (!m) return;
  FUZZ_CHECK(m->session || (m->next_index == 0 && m->workers == 0));
  Frames again = Encode(*m);
  CheckCommand(again, Command::kHeartbeat);
  auto back = DecodeBrokerHeartbeat(again);
  FUZZ_CHECK(back && back->session == m->session && back->seq == m->seq && back->next_index == m->next_index &&
             back->workers == m->workers);
}

void CheckEmpty(const Frames& frames) {
  if (!DecodeEmpty(frames).ok()) return;
  for (Command c : {Command::kDraining, Command::kDisconnect, Command::kDrain, Command::kStatus,
                    Command::kListWorkers, Command::kListSessions, Command::kShutdown}) {
    Frames again = EncodeEmpty(c);
    CheckCommand(again, c);
    FUZZ_CHECK(DecodeEmpty(again).ok());
  }
}

}  // namespace
}  // namespace gatherer::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace gatherer::fuzz;
  const gatherer::protocol::Frames frames = SplitFrames({data, size});
  CheckPeek(frames);
  CheckSessionRef(frames);
  CheckOpen(frames);
  CheckStatements(frames);
  CheckResults(frames);  // DecodeResults and DecodeResultsIndex
  CheckSession(frames);
  CheckEndSession(frames);
  CheckReady(frames);
  CheckControl(frames);
  CheckError(frames);
  CheckHeartbeat(frames);
  CheckBrokerHeartbeat(frames);
  CheckAck(frames);
  CheckSync(frames);
  CheckSynced(frames);
  CheckHolding(frames);
  CheckEmpty(frames);  // DRAINING, DISCONNECT, DRAIN, STATUS, WORKERS, SESSIONS, SHUTDOWN
  return 0;
}
