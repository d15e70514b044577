// A non-owning reference to a callable, `void()` only: what a callee needs to run a
// caller's lambda without std::function's possible allocation (steady-state steps must
// not allocate). The callable must outlive every call. Empty by default.
#pragma once
#include <memory>
#include <type_traits>

namespace moetune {

class Work {
 public:
  Work() = default;
  template <class F, class = std::enable_if_t<!std::is_same_v<std::decay_t<F>, Work>>>
  Work(F& f) : obj_(static_cast<void*>(std::addressof(f))), call_([](void* o) { (*static_cast<F*>(o))(); }) {}
  explicit operator bool() const { return call_ != nullptr; }
  void operator()() const {
    if (call_) call_(obj_);
  }

 private:
  void* obj_ = nullptr;
  void (*call_)(void*) = nullptr;
};

}  // namespace moetune
