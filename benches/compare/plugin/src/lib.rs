//! Sets one response header, named with its value in the configuration (`name: value`).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| Box::new(Root::default()));
}}

#[derive(Default)]
struct Root {
    header: Rc<(String, String)>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8(config).unwrap_or_default();
        match text.split_once(':') {
            Some((name, value)) => {
                self.header = Rc::new((name.trim().to_owned(), value.trim().to_owned()));
                true
            }
            None => false,
        }
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream(self.header.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream(Rc<(String, String)>);

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        self.set_http_response_header(&self.0 .0, Some(&self.0 .1));
        Action::Continue
    }
}
