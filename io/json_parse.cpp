// Strict JSON parsing (json_parse.hpp): nlohmann's parser with a callback that tracks
// the open objects and arrays, so that a duplicate key can be named by its full path.
#include "io/json_parse.hpp"

#include <unordered_set>
#include <vector>

namespace moetune {
namespace {

using json = nlohmann::json;

struct Frame {
  bool object = false;
  std::unordered_set<std::string> keys;  // objects: the keys seen so far
  std::string key;                       // objects: the key whose value is being parsed
  size_t index = 0;                      // arrays: the element being parsed
};

// "train.steps", "messages[2].role": where the value being parsed sits.
std::string path_of(const std::vector<Frame>& stack) {
  std::string p;
  for (const Frame& f : stack) {
    if (f.object) {
      if (!p.empty()) p += '.';
      p += f.key;
    } else {
      p += '[';
      p += std::to_string(f.index);
      p += ']';
    }
  }
  return p;
}

}  // namespace

json parse_json(const std::string& text) {
  std::vector<Frame> stack;
  const auto element_done = [&] {
    if (!stack.empty() && !stack.back().object) ++stack.back().index;
  };
  const json::parser_callback_t cb = [&](int, json::parse_event_t ev, json& parsed) {
    switch (ev) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (stack.size() >= size_t(kMaxJsonDepth)) {
          std::string at = path_of(stack);
          if (at.size() > 60) at = at.substr(0, 60) + "...";
          throw JsonError("nested deeper than " + std::to_string(kMaxJsonDepth) + " levels (at '" + at + "')");
        }
        stack.push_back(Frame{ev == json::parse_event_t::object_start, {}, {}, 0});
        break;
      case json::parse_event_t::key: {
        Frame& f = stack.back();
        f.key = parsed.get<std::string>();
        if (!f.keys.insert(f.key).second) throw JsonError("duplicate key '" + path_of(stack) + "'");
        break;
      }
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        stack.pop_back();
        element_done();
        break;
      case json::parse_event_t::value:
        element_done();
        break;
    }
    return true;
  };
  try {
    return json::parse(text, cb);
  } catch (const json::exception& e) {  // parse_error, but also out_of_range (number overflow)
    throw JsonError(e.what());
  }
}

}  // namespace moetune
