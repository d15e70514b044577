#include "dist/collective.hpp"

#include <vector>

namespace moetune::dist {

void run_collectively(const Comm& comm, const std::function<void()>& phase) {
  std::string message;
  bool failed = false;
  try {
    phase();
  } catch (const std::exception& e) {
    message = e.what();
    failed = true;
  }
  if (comm.all_true(!failed)) return;
  throw_first_error(comm, failed && message.empty() ? std::string("(an exception without a message)") : message);
}

void throw_first_error(const Comm& comm, const std::string& message) {
  const bool failed = !message.empty();
  int32_t first = failed ? comm.rank() : comm.size();
  comm.allreduce_min(std::span<int32_t>(&first, 1));
  if (first == comm.size()) throw CollectiveError("a rank failed without a message", 0);
  int64_t len = int64_t(message.size());
  comm.broadcast(std::span<int64_t>(&len, 1), first);
  std::vector<int32_t> chars(static_cast<size_t>(len));
  if (comm.rank() == first)
    for (size_t i = 0; i < message.size(); ++i) chars[i] = static_cast<unsigned char>(message[i]);
  comm.broadcast(std::span<int32_t>(chars), first);
  std::string text(chars.begin(), chars.end());
  if (comm.size() > 1 && first != 0) text = "[rank " + std::to_string(first) + "] " + text;
  throw CollectiveError(text, first);
}

}  // namespace moetune::dist
