//! Until the core's service state machine lands on `main`: the inputs whose
//! signatures are fixed, doing nothing, so the shell side builds and its
//! unit tests run. Deleted by the merge of `main`.

use crate::core::{Core, Generation, ServiceExit, ServiceSample};

impl Core {
    pub fn handle_service_probed(&mut self, _now: u64, _generation: Generation, _answered: bool) {}
    pub fn handle_service_spawned(
        &mut self,
        _now: u64,
        _generation: Generation,
        _spawned: Result<u32, String>,
    ) {
    }
    pub fn handle_service_exited(
        &mut self,
        _now: u64,
        _generation: Generation,
        _exit: ServiceExit,
    ) {
    }
    pub fn handle_service_sampled(
        &mut self,
        _now: u64,
        _generation: Generation,
        _sample: ServiceSample,
    ) {
    }
}
